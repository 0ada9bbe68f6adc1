"""KV caches behind one interface: `update(layer_idx, k, v) -> (keys, values)` for attention to use.

- DynamicCache grows with the sequence (geometric storage growth, one token written per step): exact.
- StaticCache preallocates `max_length` slots: fixed shapes, the form compiled decoding wants.
- SlidingWindowCache keeps the last `window - 1` tokens: bounded memory for sliding-window models.
- SinkCache keeps the first `sink` tokens and a recent window (StreamingLLM): bounded memory for any model.
- QuantizedCache stores older keys (per channel) and values (per token) as int8 or int4, the recent
  `residual` in full.
- OffloadedCache keeps every layer on the CPU and brings one layer at a time to the compute device.

A cache also says which absolute positions its keys hold after an update (`key_positions`), so the mask
can line queries up with keys however the cache arranges them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import GenerationError
from .hardware import available_memory


class Cache:
    """Base interface. `get_seq_length()` counts every token seen, kept or not."""

    def __init__(self) -> None:
        self.seen = 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def get_seq_length(self) -> int:
        return self.seen

    def _advance(self, layer_idx: int, q_len: int) -> None:
        if layer_idx == 0:
            self.seen += q_len

    def key_positions(self, q_len: int, device: torch.device) -> torch.Tensor | None:
        """Absolute positions of the keys attention sees once this step's `q_len` tokens are added;
        None means all positions 0 .. seen + q_len - 1, in order."""
        return None

    def crop(self, length: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot drop tokens")

    def reorder(self, rows: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot reorder rows (beam search)")

    def reserve(self, n: int) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
        """Room for `n` more positions in every layer, counted as written, for a kernel that writes them
        itself (the fused decode step): (first new slot, keys, values), each layer's storage a contiguous
        (B, H, slots, D) tensor whose slots before the first new one hold the past."""
        raise NotImplementedError(f"{type(self).__name__} keeps its keys in its own layout")


class _ListCache(Cache):
    """Per-layer key and value tensors that grow by concatenation; subclasses decide what to keep."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def _grow(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's stored keys and values with this step's appended (stored as given for a new layer)."""
        self._advance(layer_idx, k.shape[-2])
        if layer_idx == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
            return k, v
        return torch.cat((self.keys[layer_idx], k), dim=-2), torch.cat((self.values[layer_idx], v), dim=-2)


class DynamicCache(Cache):
    """Grows with the sequence, exactly. Storage grows geometrically (like a vector), so appending a
    token writes only that token instead of copying the whole history each step as concatenation would.
    `dtype` stores the keys and values in another dtype (float16 halves a float32 model's cache, as
    llama.cpp keeps its own); attention reads them back in the model's."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.dtype = dtype
        self._keys: list[torch.Tensor] = []  # (B, H, capacity, D); the first `length` slots are filled
        self._values: list[torch.Tensor] = []
        self.length = 0
        # slots every layer is known to have in contiguous storage (reserve's check, skipped below it)
        self._room = 0

    @property
    def keys(self) -> list[torch.Tensor]:
        return [k[..., : self.length, :] for k in self._keys]

    @property
    def values(self) -> list[torch.Tensor]:
        return [v[..., : self.length, :] for v in self._values]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dtype is not None and k.dtype != self.dtype:
            keys, values = self._store(layer_idx, k.to(self.dtype), v.to(self.dtype))
            return keys.to(k.dtype), values.to(v.dtype)  # the model attends in its own dtype
        return self._store(layer_idx, k, v)

    def _store(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._advance(layer_idx, k.shape[-2])
        if layer_idx == len(self._keys):  # a new layer: store as given, no copy
            self._keys.append(k)
            self._values.append(v)
            self._room = 0
            if layer_idx == 0:
                self.length = k.shape[-2]
            return k, v
        # layer 0 moves the length first; the other layers write into the same slots
        start = self.length if layer_idx == 0 else self.length - k.shape[-2]
        end = start + k.shape[-2]
        if layer_idx == 0:
            self.length = end
        keys, values = self._keys[layer_idx], self._values[layer_idx]
        if end > keys.shape[-2]:
            capacity = max(end, 2 * keys.shape[-2], 64)
            keys, values = _regrow(keys, start, capacity), _regrow(values, start, capacity)
            self._keys[layer_idx], self._values[layer_idx] = keys, values
        keys[..., start:end, :].copy_(k)
        values[..., start:end, :].copy_(v)
        return keys[..., :end, :], values[..., :end, :]

    def reserve(self, n: int) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
        start = self.length
        if start + n > self._room:  # else every layer has the room already: checking 2 x layers tensors
            for i, (keys, values) in enumerate(zip(self._keys, self._values, strict=True)):  # costs ~50 us
                # a layer stored as given (the prompt's keys, maybe a transposed view) moves into storage
                if start + n > keys.shape[-2] or not (keys.is_contiguous() and values.is_contiguous()):
                    capacity = max(start + n, 2 * keys.shape[-2], 64)
                    self._keys[i], self._values[i] = (
                        _regrow(keys, start, capacity),
                        _regrow(values, start, capacity),
                    )
            self._room = min((k.shape[-2] for k in self._keys), default=0)
        self.length += n
        self.seen += n
        return start, self._keys, self._values

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` positions (rejected speculative tokens)."""
        self.length = min(self.length, length)
        self.seen = min(self.seen, length)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep row `rows[i]` as row i (beam search follows its surviving beams)."""
        self._keys = [k.index_select(0, rows.to(k.device)) for k in self._keys]
        self._values = [v.index_select(0, rows.to(v.device)) for v in self._values]

    def __len__(self) -> int:
        return len(self._keys)


def _regrow(buffer: torch.Tensor, filled: int, capacity: int) -> torch.Tensor:
    """A buffer with room for `capacity` positions holding the first `filled` of `buffer`."""
    grown = buffer.new_empty((*buffer.shape[:-2], capacity, buffer.shape[-1]))
    grown[..., :filled, :].copy_(buffer[..., :filled, :])
    return grown


def _check_fits(shape: tuple[int, ...], like: torch.Tensor, max_length: int) -> None:
    """Refuse, before allocating, a preallocated layer (keys and values) larger than the memory free on
    its device: a clear error instead of the allocator's failure or the OOM killer."""
    nbytes = 2 * math.prod(shape) * like.element_size()
    if like.is_cuda:
        free = torch.cuda.mem_get_info(like.device)[0]
    elif like.device.type == "cpu":
        free = available_memory()
        if free is None:
            return
    else:
        return
    if nbytes > free:
        raise GenerationError(
            f"a static cache of {max_length:,} slots needs {nbytes:,} bytes for one layer's keys and values, "
            f"more than the {free:,} free on {like.device}; lower max_length / max_new_tokens"
        )


class StaticCache(Cache):
    """`max_length` preallocated slots per layer; slot i holds position i, unwritten slots are masked.

    Shapes never change and the write position is a tensor, so a compiled decode step is traced once
    and replayed for every token. The mask it gets must cover all `max_length` slots.
    """

    def __init__(self, max_length: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.max_length = max_length
        self.dtype = dtype  # the slots' dtype (None: the model's), as DynamicCache's
        self.position = torch.zeros((), dtype=torch.long)  # tokens written so far, as a tensor
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def get_seq_length(self) -> torch.Tensor:  # type: ignore[override]
        return self.position.clone()  # a snapshot: the counter itself moves during the forward

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            shape = (*k.shape[:-2], self.max_length, k.shape[-1])
            stored = self.dtype or k.dtype
            _check_fits(shape, k.new_empty(0, dtype=stored), self.max_length)
            self.keys.append(k.new_zeros(shape, dtype=stored))
            self.values.append(v.new_zeros(shape, dtype=stored))
        q_len = k.shape[-2]
        # layer 0 counts this step's tokens first, so later layers see the position already advanced
        start = self.position if layer_idx == 0 else self.position - q_len
        slots = start.to(k.device) + torch.arange(q_len, device=k.device)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(-2, slots, k.to(keys.dtype))
        values.index_copy_(-2, slots, v.to(values.dtype))
        if layer_idx == 0:
            self.position.add_(q_len)
        return keys.to(k.dtype), values.to(v.dtype)  # the model attends in its own dtype

    def key_positions(self, q_len: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.max_length, device=device)

    def reserve(self, n: int) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
        start = int(self.position)
        if start + n > self.max_length:
            raise ValueError(f"the static cache holds {self.max_length} positions; {start + n} needed")
        self.position.add_(n)
        return start, self.keys, self.values


class SlidingWindowCache(_ListCache):
    """Keeps the last `window - 1` tokens, all a sliding-window attention can still see next step."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._grow(layer_idx, k, v)
        keep = self.window - 1
        self.keys[layer_idx], self.values[layer_idx] = keys[..., -keep:, :], values[..., -keep:, :]
        return keys, values

    def key_positions(self, q_len: int, device: torch.device) -> torch.Tensor:
        start = max(0, self.seen - (self.window - 1))
        return torch.arange(start, self.seen + q_len, device=device)


class SinkCache(_ListCache):
    """The first `sink` tokens (attention sinks) and the most recent `window - sink`; memory stays
    bounded for any model. Kept keys keep their original positions."""

    def __init__(self, window: int, sink: int = 4) -> None:
        super().__init__()
        if not 0 < sink < window:
            raise ValueError(f"SinkCache needs 0 < sink < window, got sink={sink}, window={window}")
        self.window, self.sink = window, sink

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._grow(layer_idx, k, v)
        if keys.shape[-2] > self.window:
            recent = self.window - self.sink
            keys = torch.cat((keys[..., : self.sink, :], keys[..., -recent:, :]), dim=-2)
            values = torch.cat((values[..., : self.sink, :], values[..., -recent:, :]), dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = keys, values
        return keys, values

    def key_positions(self, q_len: int, device: torch.device) -> torch.Tensor:
        total = self.seen + q_len
        if total <= self.window:
            return torch.arange(total, device=device)
        recent = self.window - self.sink
        return torch.cat(
            (torch.arange(self.sink, device=device), torch.arange(total - recent, total, device=device))
        )


class QuantizedCache(Cache):
    """Older keys and values as int8 or int4, the most recent `residual` tokens in full precision;
    attention sees them dequantised.

    The scheme is KIVI's (Liu et al., 2024): asymmetric min/max quantisation, keys per channel (over the
    chunk's tokens: key outliers live in fixed channels) and values per token (over the head dimension).
    Codes are stored in uint8 with a scale and a minimum per group; 4-bit codes two to a byte (along the
    last dimension, the head size, which is even).

    The defaults are Hugging Face's (4 bits, a residual of 128). Measured on SmolLM2-135M over 300 greedy
    tokens (tests/test_gguf.py): int8 gives the exact cache's tokens even with a residual of 32 (most of the
    context quantised); int4 with the default residual gives them too, but with a residual of 64 it agrees
    on 57 % of positions only (the first difference near token 170, after which the texts go their own
    ways; 4-bit groups of 16 or 32 instead of whole chunks moved that by ±20 tokens, no more).
    """

    def __init__(self, bits: int = 4, residual: int = 128) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"QuantizedCache supports 4 or 8 bits, not {bits}")
        self.bits, self.residual = bits, residual
        self.quantized: list[list[tuple[_Quantized, _Quantized]]] = []
        self.recent: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _quantize(self, x: torch.Tensor, dim: int) -> _Quantized:
        low, high = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
        scale = ((high - low) / (2**self.bits - 1)).clamp(min=1e-8)
        codes = torch.round((x - low) / scale).clamp(0, 2**self.bits - 1).to(torch.uint8)
        packed = self.bits == 4 and codes.shape[-1] % 2 == 0
        if packed:  # two codes a byte: low nibble first
            codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
        return _Quantized(codes, scale, low, packed)

    def quantized_bytes(self) -> int:
        """Bytes the quantised part of the cache holds: codes, scales and minimums."""
        return sum(q.nbytes for layer in self.quantized for chunk in layer for q in chunk)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._advance(layer_idx, k.shape[-2])
        if layer_idx == len(self.recent):
            self.quantized.append([])
            self.recent.append((k, v))
        else:
            rk, rv = self.recent[layer_idx]
            self.recent[layer_idx] = (torch.cat((rk, k), dim=-2), torch.cat((rv, v), dim=-2))
        rk, rv = self.recent[layer_idx]
        if rk.shape[-2] > 2 * self.residual:  # move the older part into a quantised chunk
            cut = rk.shape[-2] - self.residual
            chunk = (self._quantize(rk[..., :cut, :], dim=-2), self._quantize(rv[..., :cut, :], dim=-1))
            self.quantized[layer_idx].append(chunk)
            self.recent[layer_idx] = (rk[..., cut:, :], rv[..., cut:, :])
        rk, rv = self.recent[layer_idx]
        chunks = self.quantized[layer_idx]
        keys = torch.cat([qk.dequantize(rk.dtype) for qk, _ in chunks] + [rk], dim=-2)
        values = torch.cat([qv.dequantize(rv.dtype) for _, qv in chunks] + [rv], dim=-2)
        return keys, values


@dataclass(frozen=True)
class _Quantized:
    """uint8 codes (two 4-bit codes a byte when `packed`), with a scale and a minimum per group."""

    codes: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor
    packed: bool

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        codes = self.codes
        if self.packed:
            codes = torch.stack((codes & 0x0F, codes >> 4), dim=-1).flatten(-2)
        return (codes.to(self.scale.dtype) * self.scale + self.low).to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.low))


class OffloadedCache(DynamicCache):
    """Every layer's keys and values live on the CPU between uses; a layer comes to the compute device
    for its attention and goes back, so device memory holds one layer's cache at a time."""

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = k.device
        cpu = torch.device("cpu")
        keys, values = super().update(layer_idx, k.to(cpu, non_blocking=True), v.to(cpu, non_blocking=True))
        return keys.to(device, non_blocking=True), values.to(device, non_blocking=True)


CACHES = {
    "dynamic": DynamicCache,
    "static": StaticCache,
    "sliding_window": SlidingWindowCache,
    "sink": SinkCache,
    "quantized": QuantizedCache,
    "offloaded": OffloadedCache,
}
