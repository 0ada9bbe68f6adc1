"""Rotary position embeddings: inverse frequencies for every scaling variant, and their application.

The variants follow Hugging Face's `modeling_rope_utils` so that checkpoints trained with them give the
same numbers: default, linear, dynamic (NTK), yarn, longrope and llama3.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from . import kernels

CPU = torch.device("cpu")  # tables are always computed here, whatever device the model is built on


class Rope:
    """cos/sin tables for this forward's positions, each (B, T, rotary_dim) float32, and the kernel that
    applies them ("torch", or "triton" once `set_kernels` chose it). Made once per forward and shared by
    every layer, so per-dtype views are prepared once too."""

    __slots__ = ("_prepared", "cos", "kernel", "sin")

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, kernel: str = "torch") -> None:
        self.cos, self.sin, self.kernel = cos, sin, kernel
        self._prepared: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def prepared(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin), each (B, 1, T, rotary_dim) in `dtype`. The signed sin is (-sin1, sin2), so
        rotate_half(x) * sin == x.roll(half) * signed sin, one op instead of three."""
        if dtype not in self._prepared:
            half = self.sin.shape[-1] // 2
            signed = torch.cat((-self.sin[..., :half], self.sin[..., half:]), dim=-1)
            self._prepared[dtype] = (self.cos.to(dtype).unsqueeze(1), signed.to(dtype).unsqueeze(1))
        return self._prepared[dtype]


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=CPU).float() / dim))


def inverse_frequencies(
    params: dict[str, Any], dim: int, max_position_embeddings: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq of shape (dim/2,), attention scaling applied to cos and sin)."""
    rope_type = params.get("rope_type", "default")
    base = float(params["rope_theta"])
    if rope_type == "default":
        return _base_inv_freq(base, dim), 1.0
    if rope_type == "linear":
        return _base_inv_freq(base, dim) / params["factor"], 1.0
    if rope_type == "dynamic":
        factor = params["factor"]
        seq_len = max(seq_len or max_position_embeddings, max_position_embeddings)
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if rope_type == "yarn":
        return _yarn(params, base, dim, max_position_embeddings)
    if rope_type == "longrope":
        return _longrope(params, base, dim, max_position_embeddings, seq_len)
    if rope_type == "llama3":
        return _llama3(params, base, dim), 1.0
    raise ValueError(f"unknown rope_type `{rope_type}`")


def _yarn(params: dict[str, Any], base: float, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_pos / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=CPU) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, device=CPU).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (
        1.0 / pos_freqs
    ) * extrapolation_weight
    return inv_freq, attention_factor


def _longrope(
    params: dict[str, Any], base: float, dim: int, max_pos: int, seq_len: int | None
) -> tuple[torch.Tensor, float]:
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_pos / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    long = seq_len is not None and seq_len > original
    ext = torch.tensor(params["long_factor" if long else "short_factor"], dtype=torch.float32, device=CPU)
    shape = torch.arange(0, dim, 2, dtype=torch.int64, device=CPU).float() / dim
    return 1.0 / (ext * base**shape), attention_factor


def _llama3(params: dict[str, Any], base: float, dim: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(base, dim)
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions. Dynamic and longrope variants adapt to the sequence length."""

    inv_freq: torch.Tensor

    def __init__(self, dim: int, params: dict[str, Any], max_position_embeddings: int) -> None:
        super().__init__()
        if "rope_type" not in params and params and all(isinstance(v, dict) for v in params.values()):
            # tables per layer kind: one embedding each, `rotary(q, k, kind = ...)` picks per layer
            self.kinds = nn.ModuleDict(
                {kind: RotaryEmbedding(dim, p, max_position_embeddings) for kind, p in params.items()}
            )
            return
        self.kinds = None
        if max_position_embeddings < 1 or dim < 2:
            raise ValueError(
                f"rotary tables need a head dimension of at least 2 and a positive context length; got "
                f"dim {dim}, max_position_embeddings {max_position_embeddings}"
            )
        self.dim = int(dim * params.get("partial_rotary_factor", 1.0))
        self.params = dict(params)
        self.max_position_embeddings = max_position_embeddings
        self.rope_type = params.get("rope_type", "default")
        # computed on the CPU (every factory call below names it) even while the model is built on meta
        inv_freq, self.attention_scaling = inverse_frequencies(self.params, self.dim, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.cached_len = max_position_embeddings
        self.kernel = "torch"  # set by PreTrainedModel.set_kernels

    @property
    def by_position(self) -> bool:
        """True when a position's tables do not depend on the other positions asked with it (dynamic and
        longrope scaling adapt to the longest): tables for a range of positions can be computed once."""
        return self.rope_type not in ("dynamic", "longrope")

    def _refresh(self, seq_len: int) -> None:
        if self.rope_type == "dynamic":
            if seq_len > self.cached_len or (seq_len < self.max_position_embeddings < self.cached_len):
                new_len = max(seq_len, self.max_position_embeddings)
                inv_freq, _ = inverse_frequencies(
                    self.params, self.dim, self.max_position_embeddings, new_len
                )
                self.inv_freq = inv_freq.to(self.inv_freq.device)
                self.cached_len = new_len
        elif self.rope_type == "longrope":
            inv_freq, _ = inverse_frequencies(self.params, self.dim, self.max_position_embeddings, seq_len)
            self.inv_freq = inv_freq.to(self.inv_freq.device)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> Rope | dict[str, Rope]:
        if self.kinds is not None:
            return {kind: embedding(position_ids) for kind, embedding in self.kinds.items()}
        if self.rope_type in ("dynamic", "longrope"):
            self._refresh(int(position_ids.max()) + 1)
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (B, T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, dim)
        return Rope(emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling, self.kernel)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, rope: Rope | dict[str, Rope], kind: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k, each (B, H, T, D), by this forward's tables (`kernels.rotary`); `kind` picks the
    tables of a layer kind where the model has several (`rope(full_attention = ..., ...)`)."""
    if isinstance(rope, dict):
        if kind not in rope:
            raise ValueError(f"rotary tables of kind {kind!r} requested; this model has {sorted(rope)}")
        rope = rope[kind]
    return kernels.rotary(q, k, rope)
