"""Attention backends and the mask they share.

Generated attention blocks call `attend(q, k, v, mask, ...)`. The backend is the model's
(`model.attn_implementation`, chosen with `set_attention` or at load time): the backbone hands it to
every layer with the mask it builds once per forward. Masks are built lazily from the padding mask and the causal/window
geometry, once per distinct (causal, window) pair in a forward, and shared by every layer that asks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .cache import Cache


class AttentionMask:
    """Which keys each query may see: padding, plus causality and an optional sliding window.

    `padding` is the usual (B, past + T) 0/1 attention mask (or None for no padding); queries are the
    last `q_len` positions, so a query shorter than the keys (decoding with a cache) is lower-right aligned.
    """

    def __init__(
        self,
        padding: torch.Tensor | None,
        q_len: int,
        past: int | torch.Tensor = 0,
        cache: Cache | None = None,
        backend: str = "sdpa",
    ) -> None:
        self.backend = backend  # the attention backend every layer of this forward uses
        self.q_len = q_len
        self.past = past  # a tensor under a static cache, so compiled steps do not specialise on it
        self.kv_len = past + q_len
        # Caches that drop or preallocate keys say which positions their keys hold (asked now, before
        # the layers add this step's tokens).
        self.key_positions = cache.key_positions(q_len, torch.device("cpu")) if cache is not None else None
        static = isinstance(past, torch.Tensor)
        if padding is not None:
            expected = len(self.key_positions) if static else self.kv_len  # type: ignore[arg-type]
            if padding.dim() != 2 or padding.shape[-1] != expected:
                where = "the static cache's slots" if static else f"{past} cached and {q_len} new positions"
                raise ValueError(
                    f"attention_mask has shape {tuple(padding.shape)}; expected (batch, {expected}) for {where}"
                )
            padding = padding.bool()
            if not static and bool(padding.all()):
                padding = None
        self.padding = padding
        self._cache: dict[tuple[bool, int | None, str], Any] = {}

    def needs_mask(self, causal: bool, window: int | None) -> bool:
        """False when a backend's own causal flag (or nothing at all) expresses the masking exactly."""
        if self.key_positions is not None:
            return True
        if self.padding is not None or (window is not None and window < self.kv_len):
            return True
        # Backends' `is_causal` aligns the triangle top-left; after cached positions it must be lower-right.
        return causal and self.past > 0 and self.q_len > 1

    def allowed(self, causal: bool, window: int | None, device: torch.device) -> torch.Tensor | None:
        """Bool (B|1, 1, T, S) mask, True where attention is allowed; None when nothing is masked."""
        key = (causal, window, str(device))
        if key not in self._cache:
            self._cache[key] = self._build(causal, window, device)
        return self._cache[key]

    def block_mask(self, causal: bool, window: int | None, device: torch.device) -> Any:
        """The same geometry as `allowed`, as a FlexAttention BlockMask (built once per forward)."""
        from torch.nn.attention.flex_attention import create_block_mask

        key = (causal, window, f"flex:{device}")
        if key not in self._cache:
            allowed = self.allowed(causal, window, device)
            if allowed is None:
                allowed = torch.ones((1, 1, self.q_len, self.kv_len), dtype=torch.bool, device=device)
            batch = allowed.shape[0]
            allowed = allowed.expand(batch, 1, self.q_len, allowed.shape[-1])  # rows may be broadcast

            def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
                return allowed[b if batch > 1 else 0, 0, q, k]

            q_len, kv_len = allowed.shape[-2:]
            self._cache[key] = create_block_mask(mask_mod, batch, None, q_len, kv_len, device=device)
        return self._cache[key]

    def _build(self, causal: bool, window: int | None, device: torch.device) -> torch.Tensor | None:
        past = self.past.to(device) if isinstance(self.past, torch.Tensor) else self.past
        q_pos = (past + torch.arange(self.q_len, device=device))[:, None]  # (T, 1)
        positions = torch.arange(self.kv_len) if self.key_positions is None else self.key_positions
        k_pos = positions.to(device)[None, :]  # (1, S)
        allowed = k_pos < past + self.q_len  # slots a static cache has not written yet hold nothing
        if causal:
            allowed = allowed & (k_pos <= q_pos)
        if window is not None:  # causal: the last `window` keys; else `window - 1` on either side
            distance = q_pos - k_pos
            allowed = allowed & ((distance if causal else distance.abs()) < window)
        mask = allowed[None, None]  # (1, 1, T, S)
        if self.padding is not None:
            if isinstance(self.past, torch.Tensor):  # a static cache's mask covers its slots one to one
                columns = self.padding.to(device)
            else:
                columns = self.padding.to(device)[:, positions.clamp(max=self.kv_len - 1).to(device)]
            mask = mask & columns[:, None, None, :]  # (B, 1, T, S)
            # A query with nothing to attend to (a left-padding position) would softmax to NaN and poison
            # the next layer through 0 * NaN; let it see every key instead. Its output is never used.
            mask = mask | ~mask.any(dim=-1, keepdim=True)
        return mask

    def distances(self, device: torch.device) -> torch.Tensor:
        """(T, S) |query position - key position|, with the queries after the cached positions."""
        past = self.past.to(device) if isinstance(self.past, torch.Tensor) else self.past
        q_pos = (past + torch.arange(self.q_len, device=device))[:, None]
        positions = torch.arange(self.kv_len) if self.key_positions is None else self.key_positions
        return (q_pos - positions.to(device)[None, :]).abs()

    def position_ids(self, device: torch.device) -> torch.Tensor:
        """Default positions past..past+T-1, shape (1, T), as Hugging Face uses when none are given."""
        past = self.past.to(device) if isinstance(self.past, torch.Tensor) else self.past
        return (past + torch.arange(self.q_len, device=device))[None, :]


AttentionFn = Callable[..., torch.Tensor]

# Where eager attention puts each layer's weights while a caller records them (`output_attentions`).
_RECORDED: ContextVar[list[torch.Tensor] | None] = ContextVar("specformer_recorded_attention", default=None)


@contextmanager
def recording_attention() -> Iterator[list[torch.Tensor]]:
    """Collect the attention weights eager attention computes inside this block, layer by layer."""
    weights: list[torch.Tensor] = []
    token = _RECORDED.set(weights)
    try:
        yield weights
    finally:
        _RECORDED.reset(token)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    *,
    causal: bool,
    window: int | None,
    dropout: float,
    scale: float | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """torch's fused scaled_dot_product_attention; q (B, H, T, D), k/v (B, Hkv, S, D) -> (B, H, T, D).
    A score `bias` goes in as a float mask, with -inf where the mask forbids."""
    needs_mask = mask.needs_mask(causal, window)
    gqa = q.shape[1] != k.shape[1]
    if bias is not None:
        allowed = mask.allowed(causal, window, q.device)
        scores = bias.to(q.dtype)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=scores, dropout_p=dropout, scale=scale, enable_gqa=gqa
        )
    if not needs_mask:
        is_causal = causal and mask.q_len > 1  # a single new query may see every cached key
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=is_causal, scale=scale, enable_gqa=gqa
        )
    allowed = mask.allowed(causal, window, q.device)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scale, enable_gqa=gqa
    )


def cpu_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    *,
    causal: bool,
    window: int | None,
    dropout: float,
    scale: float | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """specformer's C++ kernel for one new query per sequence on the CPU (decoding: the keys split over
    the cores, a static cache's empty slots never read), SDPA for everything else."""
    if bias is None and mask.q_len == 1 and dropout == 0 and cpu_kernels.applies_compiled_too(q, k, v):
        allowed = mask.allowed(causal, window, q.device) if mask.needs_mask(causal, window) else None
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return cpu_kernels.decode_attention(q, k, v, None if allowed is None else allowed.flatten(1), scale)
    return sdpa_attention(
        q, k, v, mask, causal=causal, window=window, dropout=dropout, scale=scale, bias=bias
    )


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    *,
    causal: bool,
    window: int | None,
    dropout: float,
    scale: float | None,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The textbook computation, softmax in float32: the reference the fused backends are tested against.
    `softcap` squashes the scores into (-softcap, softcap), then `bias` is added, before masking."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # grouped-query attention: each kv head serves `groups` query heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    masked = mask.needs_mask(causal, window) or (causal and mask.q_len > 1)
    allowed = mask.allowed(causal, window, q.device) if masked else None
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    recording = _RECORDED.get()
    if recording is not None:  # `output_attentions`: the caller keeps each layer's weights
        recording.append(weights)
    return weights @ v


def flex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    *,
    causal: bool,
    window: int | None,
    dropout: float,
    scale: float | None,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """torch's FlexAttention with a block mask, so fully masked blocks (above the causal diagonal, outside
    the window, all padding) are skipped. Compiled on accelerators; on the CPU it runs unfused (tests).
    Soft-capping and a score bias are a `score_mod`."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    if dropout > 0:
        raise ValueError("flex_attention has no attention dropout; train with attn_implementation='sdpa'")
    block_mask = mask.block_mask(causal, window, q.device)
    score_mod = None
    if softcap is not None or bias is not None:
        full = None if bias is None else bias.expand(q.shape[0], q.shape[1], *bias.shape[-2:])

        def score_mod(
            score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
        ) -> torch.Tensor:
            if softcap is not None:
                score = torch.tanh(score / softcap) * softcap
            return score if full is None else score + full[b, h, q_idx, kv_idx]

    run = _compiled_flex() if q.device.type != "cpu" else flex
    return run(
        q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex, dynamic=False)


# ---- FlashAttention-2 -------------------------------------------------------------------------------
class Unpadded(NamedTuple):
    """A padded (B, T, ...) batch packed to (total, ...) rows, as flash-attn's varlen kernels take it."""

    rows: torch.Tensor  # (total, ...) the kept positions, batch after batch
    indices: torch.Tensor  # (total,) flat index of each kept position in the (B * T) layout
    cu_seqlens: torch.Tensor  # (B + 1,) int32 offsets of each sequence in `rows`
    max_seqlen: int


def unpad(x: torch.Tensor, keep: torch.Tensor) -> Unpadded:
    """Pack `x` (B, T, ...) to the positions where `keep` (B, T) is True."""
    lengths = keep.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    rows = x.flatten(0, 1).index_select(0, indices)
    return Unpadded(rows, indices, cu_seqlens, int(lengths.max()) if len(lengths) else 0)


def repad(rows: torch.Tensor, indices: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """Inverse of `unpad`: scatter packed rows back to (B, T, ...), zeros where nothing was kept."""
    out = rows.new_zeros((batch * seq_len, *rows.shape[1:]))
    out.index_copy_(0, indices, rows)
    return out.unflatten(0, (batch, seq_len))


def flash_attention_2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    *,
    causal: bool,
    window: int | None,
    dropout: float,
    scale: float | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """FlashAttention-2: the varlen kernel for padded batches, the dense one otherwise. flash-attn aligns
    a causal mask lower-right when queries are fewer than keys, as decoding with a cache needs; GQA and
    sliding windows are native."""
    from .hardware import flash_attn_2_unusable_reason, require

    reason = flash_attn_2_unusable_reason(q.dtype, q.device)
    if reason is not None:
        raise RuntimeError(
            f"attn_implementation='flash_attention_2' cannot run: {reason}. Use 'sdpa' instead."
        )
    if mask.key_positions is not None:
        raise ValueError(
            "flash_attention_2 needs keys in position order; use the dynamic cache (the default) or 'sdpa'"
        )
    flash_attn = require("flash_attn", "attn_implementation='flash_attention_2'")
    options = {"dropout_p": dropout, "softmax_scale": scale, "causal": causal}
    if softcap is not None:
        options["softcap"] = softcap
    if window is not None:  # flash counts the keys beside the query, itself excluded
        options["window_size"] = (window - 1, 0 if causal else window - 1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # flash wants (B, T, H, D)
    if mask.padding is None:
        return flash_attn.flash_attn_func(q, k, v, **options).transpose(1, 2)
    batch, q_len = q.shape[:2]
    queries = unpad(q, mask.padding[:, -q_len:].to(q.device))
    keys = unpad(k, mask.padding.to(k.device))
    values = v.flatten(0, 1).index_select(0, keys.indices)
    out = flash_attn.flash_attn_varlen_func(
        queries.rows, keys.rows, values,
        cu_seqlens_q=queries.cu_seqlens, cu_seqlens_k=keys.cu_seqlens,
        max_seqlen_q=queries.max_seqlen, max_seqlen_k=keys.max_seqlen, **options,
    )  # fmt: skip
    return repad(out, queries.indices, batch, q_len).transpose(1, 2)


ATTENTION_BACKENDS: dict[str, AttentionFn] = {
    "sdpa": sdpa_attention,
    "specformer_cpu": cpu_decode_attention,
    "eager": eager_attention,
    "flex_attention": flex_attention,
    "flash_attention_2": flash_attention_2,
}


# What each backend can do beyond plain masked attention; a model lists what its spec uses
# (`attention_features`) and a backend lacking one is refused when the model is loaded.
BACKEND_FEATURES: dict[str, frozenset[str]] = {
    "eager": frozenset({"softcap", "score_bias"}),
    "sdpa": frozenset({"score_bias"}),
    "specformer_cpu": frozenset({"score_bias"}),
    "flex_attention": frozenset({"softcap", "score_bias"}),
    "flash_attention_2": frozenset({"softcap"}),
}
# the `attend` keyword of each feature
_FEATURE_KEYWORDS = {"softcap": "softcap", "score_bias": "bias"}


def register_attention(name: str, fn: AttentionFn, features: frozenset[str] = frozenset()) -> None:
    """Make `fn` selectable as `attn_implementation=name`; it receives the same arguments as `sdpa`, plus
    a keyword for each of `features` it supports (`softcap`)."""
    ATTENTION_BACKENDS[name] = fn
    BACKEND_FEATURES[name] = features


def missing_features(name: str, needed: frozenset[str]) -> frozenset[str]:
    """What of `needed` backend `name` cannot do."""
    return needed - BACKEND_FEATURES.get(name, frozenset())


def check_attention(name: str, dtype: torch.dtype, device: torch.device | str) -> None:
    """Fail at load time, not at the first forward, when backend `name` cannot run here; say why."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attn_implementation `{name}` is not available; choose one of {sorted(ATTENTION_BACKENDS)}"
        )
    if name == "flash_attention_2":
        from .hardware import flash_attn_2_unusable_reason

        reason = flash_attn_2_unusable_reason(dtype, device)
        if reason is not None:
            raise ValueError(
                f"attn_implementation='flash_attention_2' cannot run: {reason}. Use 'sdpa' instead."
            )


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    *,
    causal: bool = False,
    window: int | None = None,
    dropout: float = 0.0,
    scale: float | None = None,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias + mask) v with the backend the mask carries (the model's); `softcap`
    squashes the scores first (tanh(s / cap) * cap), where the backend can."""
    try:
        backend = ATTENTION_BACKENDS[mask.backend]
    except KeyError:
        raise ValueError(
            f"attn_implementation `{mask.backend}` is not available; choose one of {sorted(ATTENTION_BACKENDS)}"
        ) from None
    if bias is not None:
        bias = bias.to(q.device)
    extras = {key: value for key, value in (("softcap", softcap), ("bias", bias)) if value is not None}
    needed = frozenset(f for f, key in _FEATURE_KEYWORDS.items() if key in extras)
    for feature in sorted(missing_features(mask.backend, needed)):
        able = sorted(n for n, f in BACKEND_FEATURES.items() if feature in f)
        raise ValueError(f"attn_implementation `{mask.backend}` cannot do {feature}; use one of {able}")
    return backend(q, k, v, mask, causal=causal, window=window, dropout=dropout, scale=scale, **extras)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al.): a geometric sequence from 2^(-8/n); for a head count that
    is not a power of two, the next power's odd-numbered slopes fill the rest."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = base ** torch.arange(1, closest + 1, dtype=torch.float32)
    if closest != num_heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        count = min(closest, num_heads - closest)
        slopes = torch.cat([slopes, extra ** torch.arange(1, 2 * count + 1, 2, dtype=torch.float32)])
    return slopes


def alibi_bias(num_heads: int, mask: AttentionMask) -> torch.Tensor:
    """(1, H, T, S): -slope_h * |query position - key position|; under a causal mask only past keys
    count, where it is ALiBi's slope_h * (key - query)."""
    key = ("alibi", num_heads)
    if key not in mask._cache:
        distance = mask.distances(torch.device("cpu")).float()  # (T, S)
        mask._cache[key] = -alibi_slopes(num_heads)[:, None, None] * distance
    return mask._cache[key][None]
