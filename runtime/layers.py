"""Linear and normalisation layers and activation functions shared by every generated model."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels


class Linear(nn.Linear):
    """nn.Linear, same parameters and state_dict; decoding-sized bfloat16 products on the CPU run in
    specformer's GEMV kernel (`kernels.linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


class TransposedLinear(nn.Module):
    """y = x W + b with W stored (in, out): the layout GPT-2-era checkpoints use (transformers' `Conv1D`),
    kept so their tensors load as they are."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.t(), self.bias)

    def from_gguf(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """GGUF keeps every linear weight (out, in)."""
        return {name: tensor.t().contiguous() if name == "weight" else tensor}

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[0]}, out_features={self.weight.shape[1]}, bias={self.bias is not None}"


def is_plain_linear(module: nn.Module) -> bool:
    """A float linear layer as built (torch's or ours), not a quantized, LoRA or other subclass."""
    return type(module) in (nn.Linear, Linear)


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in float32. `unit_offset` scales by (1 + w) with w starting at zero (Gemma)."""

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.kernel = "torch"  # or "triton", set by PreTrainedModel.set_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps, self.unit_offset, self.kernel)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)

    def from_gguf(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """llama.cpp stores the scale itself, 1 + w, for a unit-offset norm."""
        return {name: tensor - 1 if self.unit_offset else tensor}

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}" + (
            ", unit_offset=True" if self.unit_offset else ""
        )


class PerHeadLayerNorm(nn.Module):
    """A LayerNorm of its own for each head of a (B, H, T, D) tensor, stored as `norms.<h>` (the layout
    checkpoints use); applied to all heads at once."""

    def __init__(self, num_heads: int, dim: int, eps: float = 1e-5, bias: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=eps, bias=bias) for _ in range(num_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.stack([norm.weight for norm in self.norms]).unsqueeze(1)  # (H, 1, D)
        y = F.layer_norm(x, x.shape[-1:], eps=self.eps) * weight
        if self.norms[0].bias is not None:
            y = y + torch.stack([norm.bias for norm in self.norms]).unsqueeze(1)
        return y

    def from_gguf(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """GGUF stacks the heads' parameters into one (heads, dim) tensor."""
        if tensor.shape[0] != len(self.norms):
            raise ValueError(f"{tuple(tensor.shape)} does not stack {len(self.norms)} heads")
        return {f"norms.{h}.{name}": row.clone() for h, row in enumerate(tensor)}


class Embedding(nn.Embedding):
    """An embedding table that can hold fixed sinusoidal position codes instead of learned vectors
    (DistilBERT's `sinusoidal_pos_embds`), or whose rows are multiplied by a constant `scale` (Gemma's
    sqrt(hidden_size)); a checkpoint's values are loaded either way."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        sinusoidal: bool = False,
        scale: float | None = None,
    ) -> None:
        self.sinusoidal = sinusoidal
        self.scale = scale
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)
        if sinusoidal:
            self.weight.requires_grad_(False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = super().forward(input)
        if self.scale is None:
            return rows
        # The factor is rounded to the table's dtype first, as Hugging Face does: bf16 results match too.
        return rows * torch.tensor(self.scale, dtype=rows.dtype)

    def reset_parameters(self) -> None:
        if not self.sinusoidal:
            super().reset_parameters()
            return
        if self.weight.is_meta:
            return
        with torch.no_grad():
            self.weight.copy_(sinusoidal_positions(self.num_embeddings, self.embedding_dim))

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", scale={self.scale}" if self.scale is not None else "")


def sinusoidal_positions(positions: int, dim: int) -> torch.Tensor:
    """sin on even and cos on odd dims of pos / 10000^(2i/dim), computed in float64 like the original."""
    pos = torch.arange(positions, dtype=torch.float64)[:, None]
    i = torch.arange(dim, dtype=torch.float64)[None, :]
    angles = pos / torch.pow(10000.0, 2 * torch.div(i, 2, rounding_mode="floor") / dim)
    table = torch.empty(positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table.float()


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# Hugging Face `hidden_act` names -> functions with the same numerics.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_fast,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


class Activation(nn.Module):
    """The activation a config names (`hidden_act`), callable like the function; `gated(gate, up)` is
    act(gate) * up, the GLU product, which a fused kernel can compute in one pass."""

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation `{name}`; expected one of {sorted(ACTIVATIONS)}")
        self.name = name
        self.fn = ACTIVATIONS[name]
        self.kernel = "torch"  # or "triton", set by PreTrainedModel.set_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return kernels.gated(self.name, self.fn, gate, up, self.kernel)

    def extra_repr(self) -> str:
        return self.name


def activation(name: str) -> Activation:
    """The activation called `name` in a config, with a clear error for an unknown one."""
    return Activation(name)
