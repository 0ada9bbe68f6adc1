"""Safetensors checkpoints in the Hugging Face layout: single file or shards with an index."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .files import atomic_path, atomic_write_text

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, malformed, or does not fit the model."""


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, single or sharded."""
    index = directory / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not there: {', '.join(missing)}")
        return files
    single = directory / WEIGHTS_NAME
    if single.is_file():
        return [single]
    raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) for every tensor, memory-mapped: a tensor is read when it is used."""
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield key, handle.get_tensor(key)


def _shard_plan(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def parse_size(size: int | str) -> int:
    """`5GB`, `500MB`, `10KiB` or a number of bytes."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"max_shard_size `{size}`: expected bytes or a size such as `5GB`") from None


def save_state_dict(
    state: dict[str, torch.Tensor], directory: Path, max_shard_size: int | str = "5GB"
) -> list[Path]:
    """Write `state` as one file or as shards plus an index; each file appears only once complete."""
    state = {k: v.detach().contiguous() for k, v in state.items()}
    shards = _shard_plan(state, parse_size(max_shard_size))
    metadata = {"format": "pt"}
    if len(shards) == 1:
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(shards[0], os.fspath(tmp), metadata=metadata)
        (directory / WEIGHTS_INDEX_NAME).unlink(missing_ok=True)
        return [directory / WEIGHTS_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards, strict=True):
        with atomic_path(directory / name) as tmp:
            save_file(shard, os.fspath(tmp), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    # The index goes last: a reader never sees an index that points at shards not yet written.
    atomic_write_text(directory / WEIGHTS_INDEX_NAME, json.dumps(index, indent=2) + "\n")
    (directory / WEIGHTS_NAME).unlink(missing_ok=True)
    return [directory / n for n in names]
