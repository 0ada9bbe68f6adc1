"""Where each part of a model lives: `device_map` = "cpu", "cuda", "auto" or {module prefix: device}.

A model split across devices gets forward pre-hooks that move each placed module's inputs to its
device, so the generated code stays device-agnostic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .checkpoint import parse_size

DeviceMap = str | Mapping[str, str | int | torch.device]


def _device(value: str | int | torch.device) -> torch.device:
    device = torch.device(f"cuda:{value}" if isinstance(value, int) else value)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device_map places weights on {device}, but CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device_map names {device}, but only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    return device


def resolve_device_map(
    model: nn.Module, device_map: DeviceMap | None, max_memory: Mapping[str | int, int | str] | None = None
) -> dict[str, torch.device]:
    """{module prefix: device}; the empty prefix is the whole model."""
    if device_map is None:
        return {"": torch.device("cpu")}
    if isinstance(device_map, str):
        if device_map == "auto":
            return _auto(model, max_memory)
        return {"": _device(device_map)}
    names = {name for name, _ in model.named_modules()}
    plan: dict[str, torch.device] = {}
    for prefix, value in device_map.items():
        if prefix not in names:
            raise ValueError(f"device_map names `{prefix}`, which is not a module of {type(model).__name__}")
        plan[prefix] = _device(value)
    return plan


def _auto(model: nn.Module, max_memory: Mapping[str | int, int | str] | None) -> dict[str, torch.device]:
    """Fill GPUs in order with whole units (a decoder layer is never split), then the CPU."""
    gpus = list(range(torch.cuda.device_count()))
    if not gpus:
        return {"": torch.device("cpu")}
    budget: dict[torch.device, int] = {}
    for index in gpus:
        limit = (max_memory or {}).get(index)
        free = torch.cuda.mem_get_info(index)[0] if limit is None else parse_size(limit)
        budget[torch.device(f"cuda:{index}")] = int(free * (0.9 if limit is None else 1.0))
    plan: dict[str, torch.device] = {}
    devices = list(budget)
    current = 0
    for prefix, unit in _units(model):
        size = sum(p.numel() * p.element_size() for p in unit.parameters())
        while current < len(devices) and size > budget[devices[current]]:
            current += 1
        if current == len(devices):
            plan[prefix] = torch.device("cpu")
            continue
        budget[devices[current]] -= size
        plan[prefix] = devices[current]
    return plan


def _units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The pieces `auto` places: each element of a ModuleList, and every module holding parameters
    of its own outside those lists."""
    units: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        if isinstance(module, nn.ModuleList):
            units.extend((f"{prefix}.{i}" if prefix else str(i), child) for i, child in enumerate(module))
            return
        children = list(module.named_children())
        if not any(True for _ in module.parameters()) and not children:
            return
        if not any(any(True for _ in c.parameters()) for _, c in children) or not children:
            units.append((prefix, module))
            return
        for name, child in children:
            walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", model)
    return units


def device_for(key: str, plan: Mapping[str, torch.device]) -> torch.device:
    """The device of the longest prefix of `key` in the plan."""
    best, device = -1, torch.device("cpu")
    for prefix, target in plan.items():
        if (not prefix or key == prefix or key.startswith(prefix + ".")) and len(prefix) > best:
            best, device = len(prefix), target
    return device


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def attach_device_hooks(model: nn.Module, plan: Mapping[str, torch.device]) -> None:
    """Move a placed module's tensor inputs to its device before it runs (only where devices differ)."""
    if len({d for d in plan.values()}) <= 1:
        return
    for prefix, device in plan.items():
        if device.type == "meta" or not prefix:
            continue
        module = model.get_submodule(prefix)

        def hook(module: nn.Module, args: tuple, kwargs: dict, device: torch.device = device) -> tuple:
            return _to(args, device), _to(kwargs, device)

        module.register_forward_pre_hook(hook, with_kwargs=True)
