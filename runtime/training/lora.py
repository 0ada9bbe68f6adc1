"""LoRA adapters on the spec's projection names: y = base(x) + (alpha / r) * B(A(dropout(x))).

`get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))` wraps the named Linear layers in
place (any layer with `in_features`/`out_features`, so a bitsandbytes 4-bit base gives QLoRA), freezes
everything else, and returns the model. Adapters save alone (`save_adapter`) in PEFT's file names and
key layout, load back (`load_adapter`), and fold into the base weights (`merge_and_unload`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..files import atomic_path, atomic_write_text
from ..layers import is_plain_linear
from ..moe import Experts

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoraConfig:
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    bias: str = "none"
    peft_type: str = "LORA"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoraConfig: r={self.r}; expected an integer >= 1")
        if not self.target_modules:
            raise ValueError(
                "LoraConfig: target_modules is empty; name the projections to adapt, e.g. ['q_proj']"
            )

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


class LoraLinear(nn.Module):
    """A frozen base layer plus a trainable low-rank update; B starts at zero, so training starts from
    the base model exactly."""

    def __init__(self, base: nn.Module, config: LoraConfig) -> None:
        super().__init__()
        self.base_layer = base
        self.scaling = config.scaling
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        device = next(base.parameters()).device
        self.lora_A = nn.Linear(base.in_features, config.r, bias=False, device=device)
        self.lora_B = nn.Linear(config.r, base.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return self.base_layer(x) + (update * self.scaling).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


class ExpertsLora(nn.Module):
    """Low-rank updates of every expert of an `Experts` stack: expert e's matrix W_e + (alpha / r) B_e A_e,
    for its gate_up_proj and down_proj. B starts at zero, so training starts from the base model."""

    def __init__(self, experts: Experts, config: LoraConfig) -> None:
        super().__init__()
        self.scaling = config.scaling
        device = experts.gate_up_proj.device
        for name in ("gate_up_proj", "down_proj"):
            count, out_features, in_features = getattr(experts, name).shape
            a = nn.Parameter(torch.empty(count, config.r, in_features, device=device))
            for matrix in a.data:
                nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))
            self.register_parameter(f"{name}_A", a)
            self.register_parameter(
                f"{name}_B", nn.Parameter(torch.zeros(count, out_features, config.r, device=device))
            )

    def delta(self, name: str, expert: int) -> torch.Tensor:
        return (getattr(self, f"{name}_B")[expert] @ getattr(self, f"{name}_A")[expert]) * self.scaling


def _targets(model: nn.Module, names: list[str]) -> list[str]:
    found = [
        name
        for name, module in model.named_modules()
        if any(name == t or name.endswith("." + t) for t in names)
        and (hasattr(module, "in_features") or isinstance(module, Experts))
        and not isinstance(module, LoraLinear)
    ]
    if not found:
        raise ValueError(
            f"LoraConfig.target_modules {names} match no layer with in/out features (or expert stack) in "
            f"{type(model).__name__}"
        )
    return found


def get_peft_model(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap `config.target_modules` with LoRA in place; only adapter weights stay trainable."""
    for param in model.parameters():
        param.requires_grad_(False)
    for name in _targets(model, config.target_modules):
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        target = getattr(owner, attr)
        if isinstance(target, Experts):  # each expert's matrices get their own low-rank update
            target.adapter = ExpertsLora(target, config)
            continue
        setattr(owner, attr, LoraLinear(target, config))
    model.lora_config = config  # type: ignore[assignment]
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def expert_adapters(model: nn.Module) -> dict[str, ExpertsLora]:
    return {
        name: m.adapter
        for name, m in model.named_modules()
        if isinstance(m, Experts) and m.adapter is not None
    }


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights only, under PEFT's keys (`base_model.model.<layer>.lora_A.weight`); an expert
    stack's as `base_model.model.<stack>.<gate_up_proj|down_proj>_<A|B>` (one matrix per expert)."""
    state = {
        f"base_model.model.{name}.{part}.weight": getattr(layer, part).weight.detach().contiguous()
        for name, layer in lora_layers(model).items()
        for part in ("lora_A", "lora_B")
    }
    for name, adapter in expert_adapters(model).items():
        state |= {
            f"base_model.model.{name}.{key}": p.detach().contiguous() for key, p in adapter.named_parameters()
        }
    return state


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config: LoraConfig = model.lora_config  # type: ignore[assignment]
    with atomic_path(directory / ADAPTER_WEIGHTS) as tmp:
        save_file(adapter_state_dict(model), os.fspath(tmp), metadata={"format": "pt"})
    atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(asdict(config), indent=2) + "\n")
    return directory


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Wrap `model` as the saved adapter config says and load the adapter weights (all must be present)."""
    directory = Path(directory)
    values: dict[str, Any] = json.loads((directory / ADAPTER_CONFIG).read_text())
    config = LoraConfig(**{k: v for k, v in values.items() if k in LoraConfig.__dataclass_fields__})
    get_peft_model(model, config)
    state = load_file(os.fspath(directory / ADAPTER_WEIGHTS))
    expected = adapter_state_dict(model)
    if set(state) != set(expected):
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise KeyError(f"{directory / ADAPTER_WEIGHTS}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            getattr(layer, part).weight.data.copy_(state[f"base_model.model.{name}.{part}.weight"])
    for name, adapter in expert_adapters(model).items():
        for key, param in adapter.named_parameters():
            param.data.copy_(state[f"base_model.model.{name}.{key}"])
    return model


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base Linear and remove the wrappers: a plain model again."""
    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        if not is_plain_linear(base):
            raise TypeError(
                f"{name}: merging needs a float nn.Linear base, not {type(base).__name__}; dequantise first"
            )
        base.weight += layer.delta_weight().to(base.weight.dtype)
        owner_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner_name), attr, base)
    for name, adapter in expert_adapters(model).items():
        experts = model.get_submodule(name)
        for part in ("gate_up_proj", "down_proj"):
            stack = getattr(experts, part)
            stack += torch.stack([adapter.delta(part, e) for e in range(stack.shape[0])]).to(stack.dtype)
        experts.adapter = None
    for param in model.parameters():
        param.requires_grad_(True)
    model.__dict__.pop("lora_config", None)
    return model
