"""Checkpoints in the Hugging Face layout: safetensors (single or sharded with an index), legacy `.bin`.

Reading is lazy and memory-mapped: a tensor's bytes are read when the model first touches them, and the
model's parameters are the mapped tensors themselves, so loading needs no second copy in RAM.

Saving never leaves a half-written checkpoint in place of a good one: every file is staged beside its
target and the whole set is switched in by one journaled commit (`files.FolderSave`), so a crash at any
moment leaves either the old checkpoint or the new one, each complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError
from .files import FolderSave, read_json_object

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
LEGACY_NAME = "pytorch_model.bin"
LEGACY_INDEX_NAME = "pytorch_model.bin.index.json"


def _read_index(index: Path) -> dict[str, str]:
    weight_map = read_json_object(index, CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: `weight_map` must map tensor names to shard file names")
    return weight_map


def checkpoint_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint folder: sharded or single safetensors, else legacy `.bin`."""
    for index_name, single_name in ((WEIGHTS_INDEX_NAME, WEIGHTS_NAME), (LEGACY_INDEX_NAME, LEGACY_NAME)):
        index = directory / index_name
        if index.is_file():
            weight_map = _read_index(index)
            files = [directory / name for name in dict.fromkeys(weight_map.values())]
            root = directory.resolve()
            for name in dict.fromkeys(weight_map.values()):
                # a shard is a file of this folder: an index naming `../x` or `/etc/x` is not followed
                if Path(name).is_absolute() or root not in (directory / name).resolve().parents:
                    key = next(k for k, v in weight_map.items() if v == name)
                    raise CheckpointError(
                        f"{index} maps `{key}` to {name!r}, outside the checkpoint folder; shards are files in it"
                    )
            for file in files:
                if not file.is_file():
                    keys = [k for k, v in weight_map.items() if directory / v == file]
                    raise CheckpointError(
                        f"{index} maps {len(keys)} tensor(s) (e.g. `{keys[0]}`) to {file.name}, which is missing"
                    )
            return files
        if (directory / single_name).is_file():
            return [directory / single_name]
    raise CheckpointError(f"{directory}: no {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or {LEGACY_NAME}")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) for every tensor, memory-mapped: bytes are read when the tensor is first used."""
    for file in files:
        if file.suffix == ".bin":
            yield from _legacy_tensors(file)
            continue
        try:
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    try:
                        yield key, handle.get_tensor(key)
                    except SafetensorError as err:
                        raise CheckpointError(f"{file}: tensor `{key}` cannot be read: {err}") from None
        except SafetensorError as err:
            raise CheckpointError(
                f"{file}: not a valid safetensors file ({err}); it may be truncated"
            ) from None


def count_tensors(files: list[Path]) -> int:
    """How many tensors the files hold, from their headers alone (for progress bars)."""
    total = 0
    for file in files:
        if file.suffix == ".bin":
            return 0  # unknown without unpickling; the bar then counts without a total
        try:
            with safe_open(file, framework="pt") as handle:
                total += len(handle.keys())
        except SafetensorError as err:
            raise CheckpointError(
                f"{file}: not a valid safetensors file ({err}); it may be truncated"
            ) from None
    return total


def _legacy_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Pickled PyTorch weights, read with `weights_only=True` so no code in the file can run."""
    warnings.warn(
        f"{file.name} is a legacy pickle checkpoint; it is read with torch.load(weights_only=True). "
        "Re-save it with save_pretrained to get safetensors.",
        stacklevel=3,
    )
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # pre-1.6 format: no mmap
    except Exception as err:  # torch raises many kinds for corrupt or unsafe pickles
        raise CheckpointError(f"{file}: cannot be read safely: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a state dict, found {type(state).__name__}")
    yield from state.items()


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


def existing_weight_files(directory: Path) -> set[str]:
    """The weight files and indexes of the checkpoint in `directory`: what a new save replaces."""
    names: set[str] = set()
    for index_name in (WEIGHTS_INDEX_NAME, LEGACY_INDEX_NAME):
        index = directory / index_name
        if index.is_file():
            with contextlib.suppress(CheckpointError):  # a broken index is replaced all the same
                names.update(_read_index(index).values())
            names.add(index_name)
    for name in (WEIGHTS_NAME, LEGACY_NAME):
        if (directory / name).is_file():
            names.add(name)
    return names


def stage_state_dict(
    save: FolderSave, state: dict[str, torch.Tensor], max_shard_size: int | str
) -> list[str]:
    """Stage `state` in `save` as one file, or as shards plus an index; the names of the weight files."""
    state = {k: v.detach().contiguous() for k, v in state.items()}
    shards = _shard_plan(state, parse_size(max_shard_size))
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save.write(WEIGHTS_NAME, lambda path: save_file(shards[0], os.fspath(path), metadata=metadata))
        return [WEIGHTS_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards, strict=True):
        save.write(name, lambda path, shard=shard: save_file(shard, os.fspath(path), metadata=metadata))
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    save.write_text(WEIGHTS_INDEX_NAME, json.dumps(index, indent=2) + "\n")
    return names


def save_state_dict(
    state: dict[str, torch.Tensor], directory: Path, max_shard_size: int | str = "5GB"
) -> list[Path]:
    """Write `state` as one file or as shards plus an index, replacing any checkpoint already there
    in one switch (see `FolderSave`)."""
    with FolderSave(directory) as save:
        names = stage_state_dict(save, state, max_shard_size)
        save.commit(remove=existing_weight_files(directory))
    return [directory / name for name in names]
