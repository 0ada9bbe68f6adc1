"""What every quantization method shares: which linear layers it replaces, how, and how the choice is
remembered in the model's config."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from ..layers import is_plain_linear


def quantizable_linears(model: nn.Module, skip: Iterable[str] = (), include: Iterable[str] = ()) -> list[str]:
    """Names of the `nn.Linear` modules quantization replaces: those of the backbone, minus `skip`
    (a name or a dotted suffix such as `o_proj`). Heads stay in full precision unless in `include`; a
    head tied to the embeddings is then untied (the embedding lookup keeps its float table)."""
    prefix = getattr(model, "base_model_prefix", "")
    has_backbone = bool(prefix) and isinstance(getattr(model, prefix, None), nn.Module)
    skip = tuple(skip)
    names = []
    for name, module in model.named_modules():
        if not is_plain_linear(module):
            continue
        if has_backbone and not name.startswith(prefix + ".") and name not in include:
            continue  # a head of this model
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        names.append(name)
    return names


def replace_modules(
    model: nn.Module, names: Iterable[str], make: Callable[[str, nn.Module], nn.Module]
) -> None:
    """Swap each named submodule for `make(name, old)`."""
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        setattr(owner, attr, make(name, getattr(owner, attr)))


def remember_quantization(model: nn.Module, values: dict[str, Any]) -> None:
    config = getattr(model, "config", None)
    if config is not None:
        config.extra["quantization_config"] = values


def memory_footprint(model: nn.Module, buffers: bool = True) -> int:
    """Bytes held by the model's parameters (and buffers), each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    tensors = list(model.parameters()) + (list(model.buffers()) if buffers else [])
    for tensor in tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total
