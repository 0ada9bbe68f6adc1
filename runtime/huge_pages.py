"""A model's CPU weights in huge pages.

Decoding reads every weight once a token. From 4 KB pages that is a TLB miss every 4 KB (19,000 page walks
a token for a 76 MB model, each a two-level walk in a virtual machine), and the hardware prefetchers stop at
every page boundary. Measured on a 2-core VM (AVX-512) over 256 MB: a plain one-thread read streams 22 GB/s
from 4 KB pages and 31 from 2 MB pages; the int4 GEMV kernel 13.5 and 17-18 on one thread, 20-22 and 25-36
on two. `gather_into_huge_pages` copies a module's CPU tensors into one anonymous mapping advised as
transparent huge pages and points its parameters and buffers there, keeping every tie and every view of a
shared storage (same values, same Parameter objects).

Linux only, with transparent huge pages in `madvise` or `always` mode; elsewhere nothing moves.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .hardware import available_memory

HUGE_PAGE = 2 << 20
_ALIGNMENT = 64  # a tensor keeps its address modulo this (the kernels' vector loads)
# Below this, a model's weights fit the TLB's reach anyway (Zen 4: 3072 entries x 4 KB) and a 2 MB page
# would mostly hold nothing.
WORTH_IT = 16 << 20


def huge_pages_available() -> bool:
    """Whether this system hands out transparent huge pages to a mapping that asks (`madvise` or `always`)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


def huge_page_buffer(nbytes: int) -> torch.Tensor | None:
    """`nbytes` of zeroed uint8 memory in huge pages (2 MB aligned), or None where the system has none.
    The tensor keeps its mapping alive."""
    if not huge_pages_available():
        return None
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: the faults then take whole 2 MB pages
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start : start + nbytes]


def _tensors(module: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    """Every CPU parameter and buffer holding its own memory: tensor subclasses that wrap others (a
    tensor-parallel DTensor, a bitsandbytes parameter) are left as they are."""
    for owner in module.modules():
        for name, tensor in (*owner._parameters.items(), *owner._buffers.items()):
            if tensor is None or type(tensor.data) is not torch.Tensor:
                continue
            if tensor.device.type == "cpu" and tensor.numel() > 0:
                yield owner, name, tensor


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes [start, end) of its storage a tensor reads."""
    size = tensor.element_size()
    last = sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride(), strict=True))
    start = tensor.storage_offset() * size
    return start, start + (last + 1) * size


def _storage_spans(tensors: list[torch.Tensor]) -> dict[int, tuple[torch.Tensor, int, int]]:
    """Per storage the tensors read: (one tensor on it, first byte, end byte) of the range they cover."""
    spans: dict[int, tuple[torch.Tensor, int, int]] = {}
    for tensor in tensors:
        key = tensor.untyped_storage().data_ptr()
        start, end = _span(tensor)
        _, low, high = spans.get(key, (tensor, start, end))
        spans[key] = (tensor, min(low, start), max(high, end))
    return spans


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the distinct storage ranges a module's CPU parameters and buffers read."""
    spans = _storage_spans([tensor for _, _, tensor in _tensors(module)])
    return sum(high - low for _, low, high in spans.values())


def gather_into_huge_pages(module: nn.Module) -> int:
    """Copy `module`'s CPU parameters and buffers into one huge-page mapping and point them there; the
    bytes moved (0 where the system has no huge pages). Tensors sharing a storage (ties, views of one
    block of memory) still share one afterwards; gradients and requires_grad are kept."""
    entries = list(_tensors(module))
    spans = _storage_spans([tensor for _, _, tensor in entries])
    places: dict[int, int] = {}  # storage -> where its byte `low` lands in the arena
    cursor = 0
    for key, (_, low, high) in spans.items():
        cursor += -(cursor - low) % _ALIGNMENT  # the same address modulo the alignment as before
        places[key] = cursor
        cursor += high - low
    arena = huge_page_buffer(cursor) if cursor else None
    if arena is None:
        return 0
    for key, (tensor, low, high) in spans.items():
        source = torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage(), low, (high - low,), (1,))
        arena[places[key] : places[key] + high - low].copy_(source)
    storage = arena.untyped_storage()
    base = arena.storage_offset()
    moved: dict[int, torch.Tensor] = {}  # by the old tensor's identity: each tie is moved once
    for owner, name, tensor in entries:
        if id(tensor) not in moved:
            key = tensor.untyped_storage().data_ptr()
            offset = base + places[key] + _span(tensor)[0] - spans[key][1]
            view = torch.empty(0, dtype=tensor.dtype).set_(
                storage, offset // tensor.element_size(), tensor.shape, tensor.stride()
            )
            if isinstance(tensor, nn.Parameter):
                tensor.data = view  # the Parameter stays (optimizers, ties and hooks hold it)
                view = tensor
            moved[id(tensor)] = view
        if name in owner._buffers:
            owner._buffers[name] = moved[id(tensor)]
    return cursor


def place_in_huge_pages(module: nn.Module, wanted: bool | None) -> int:
    """`gather_into_huge_pages` where `wanted`, or (None) where it pays: a model of at least WORTH_IT
    bytes whose copy fits in the memory available next to it."""
    if wanted is False:
        return 0
    if wanted is None:
        size = weight_bytes(module)
        free = available_memory()
        if size < WORTH_IT or (free is not None and size > free // 2):
            return 0
    return gather_into_huge_pages(module)
