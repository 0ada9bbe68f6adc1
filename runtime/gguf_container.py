"""The GGUF container, read in one pass: metadata values as Python values (arrays of numbers as numpy
arrays), tensor descriptions, and each tensor's bytes as a view of the memory-mapped file.

The `gguf` package's reader builds a numpy view for every part of every metadata value, which for a
vocabulary of 49,152 tokens and as many merges is two seconds of a load; this reads the same file in a
few tens of milliseconds. Every count and length is checked against the bytes that remain before it is
used, so a corrupt or lying file is a CheckpointError, never a huge allocation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import CheckpointError

# GGUF value types: struct format of the scalar ones; 8 is a string, 9 an array
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9
# tensor types stored as plain numbers (the rest are blocks, bf16 included, kept as bytes per row)
_PLAIN = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "<i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}
_MAX_DIMS = 8


@dataclass
class Field:
    value: Any

    def contents(self) -> Any:
        return self.value.tolist() if isinstance(self.value, np.ndarray) else self.value


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: the fastest-moving dimension first
    tensor_type: Any  # gguf.GGMLQuantizationType
    data_offset: int  # in the file
    data: np.ndarray  # (rows..., row bytes) for block types, else the values, numpy (row-major) order


class GGUFContainer:
    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._buffer = memoryview(self._map)
        self._at = 0
        if bytes(self._take(4)) != b"GGUF":
            raise self._error("no GGUF magic")
        version = self._scalar("<I")
        if version not in (2, 3):
            raise self._error(f"GGUF version {version}; expected 2 or 3")
        tensors, entries = self._scalar("<Q"), self._scalar("<Q")
        self.fields: dict[str, Field] = {}
        for _ in range(entries):
            key = self._string()
            self.fields[key] = Field(self._value(self._scalar("<I")))
        alignment = self.fields.get("general.alignment", Field(32)).value
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self._error(f"general.alignment is {alignment!r}; expected a power of two")
        infos = []
        for _ in range(tensors):
            name = self._string()
            dims = self._scalar("<I")
            if dims > _MAX_DIMS:
                raise self._error(f"tensor `{name}` has {dims} dimensions")
            shape = tuple(self._scalar("<Q") for _ in range(dims))
            infos.append((name, shape, self._scalar("<I"), self._scalar("<Q")))
        self.data_offset = -(-self._at // alignment) * alignment
        self.tensors = [self._tensor(gguf, *info) for info in infos]

    def _error(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a readable GGUF file ({what} at byte {self._at:,})")

    def _take(self, size: int) -> memoryview:
        if size < 0 or self._at + size > len(self._buffer):
            raise self._error(f"{size:,} bytes wanted, {len(self._buffer) - self._at:,} left")
        view = self._buffer[self._at : self._at + size]
        self._at += size
        return view

    def _scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        try:
            return bytes(self._take(self._scalar("<Q"))).decode("utf-8")
        except UnicodeDecodeError as err:
            raise self._error(f"a string that is not UTF-8 ({err.reason})") from None

    def _value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self._scalar(_SCALARS[kind])
        if kind == _STRING:
            return self._string()
        if kind != _ARRAY:
            raise self._error(f"unknown value type {kind}")
        item, count = self._scalar("<I"), self._scalar("<Q")
        if item in _NUMPY:
            width = np.dtype(_NUMPY[item]).itemsize
            return np.frombuffer(self._take(count * width), dtype=_NUMPY[item])
        if count > len(self._buffer) - self._at:  # every element takes at least a byte
            raise self._error(f"an array of {count:,} values")
        return [self._value(item) for _ in range(count)]

    def _tensor(self, gguf: Any, name: str, shape: tuple[int, ...], kind: int, offset: int) -> TensorInfo:
        try:
            qtype = gguf.GGMLQuantizationType(kind)
            block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise self._error(f"tensor `{name}` has unknown type {kind}") from None
        count = int(np.prod(shape, dtype=np.float64)) if shape else 1
        if not shape or shape[0] % block or count > len(self._buffer):
            raise self._error(f"tensor `{name}` has shape {shape} for {qtype.name} blocks of {block}")
        size = count // block * block_bytes
        start = self.data_offset + offset
        if start + size > len(self._buffer) or offset < 0:
            raise CheckpointError(
                f"{self.path}: tensor `{name}` ends past the end of the file; it is truncated"
            )
        raw = self._map[start : start + size]
        rows = tuple(reversed(shape[1:]))
        if qtype.name in _PLAIN:
            data = raw.view(_PLAIN[qtype.name]).reshape(*rows, shape[0])
        else:  # bf16 and the block types: bytes per row, as the gguf package's dequantisers take them
            data = raw.reshape(*rows, shape[0] // block * block_bytes)
        return TensorInfo(name, shape, qtype, start, data)
