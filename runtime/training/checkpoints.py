"""Trainer checkpoints: everything needed to continue a run exactly where it stopped (weights,
optimizer, scheduler, scaler, RNG states, trainer state), written to a temporary directory that is
renamed into place, so a crash mid-save leaves the previous checkpoint intact."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import checkpoint_files, iter_tensors, save_state_dict
from .args import TrainingArguments
from .callbacks import TrainerState

CHECKPOINT_PREFIX = "checkpoint"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP or torch.compile wrapper."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict; under FSDP every rank takes part in gathering it."""
    inner = unwrap(model)
    if any(type(p).__name__ == "DTensor" for p in inner.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return inner.state_dict()


def dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop second names of shared tensors (tied weights): safetensors stores each tensor once."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident in seen and tensor.numel() > 0:
            continue
        seen.add(ident)
        out[key] = tensor
    return out


def checkpoints(root: Path) -> list[Path]:
    """The `checkpoint-N` directories under `root`, oldest step first."""
    if not root.exists():
        return []
    for aside in root.glob(f".{CHECKPOINT_PREFIX}-*.old"):
        final = root / aside.name[1 : -len(".old")]
        if _CHECKPOINT_RE.match(final.name) and not final.exists():
            os.replace(aside, final)  # killed between moving it aside and renaming the new one in
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def write_checkpoint(
    final: Path,
    state: dict[str, torch.Tensor],
    parts: dict[str, Any],
    trainer_state: TrainerState,
    args: TrainingArguments,
) -> None:
    """Write one checkpoint: the weights, each of `parts` (name -> object with a state_dict, or None)
    as `<name>.pt`, the RNG states, the trainer state and the arguments; committed by one rename."""
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_state_dict(dedupe(state), tmp)
    for name, part in parts.items():
        if part is not None:
            torch.save(part.state_dict(), tmp / f"{name}.pt")
    torch.save(_rng_state(), tmp / "rng_state.pt")
    trainer_state.save_to_json(tmp / "trainer_state.json")
    args.save(tmp / "training_args.json")
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(old, ignore_errors=True)  # a killed earlier save's leftover
    if final.exists():  # moved aside in one rename: a kill never leaves a half-deleted checkpoint-N
        os.replace(final, old)
    os.replace(tmp, final)  # the commit point: a crash before it leaves the last checkpoint as it was
    shutil.rmtree(old, ignore_errors=True)


def rotate(root: Path, limit: int | None, best: str | None) -> None:
    """Delete the oldest checkpoints past `limit`, never the best one."""
    if limit is None or limit <= 0:
        return
    found = checkpoints(root)
    kept = Path(best) if best else None
    removable = [c for c in found if kept is None or c.resolve() != kept.resolve()]
    keep = limit - (1 if kept is not None and kept in found else 0)
    for old in removable[: max(len(removable) - max(keep, 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def load_weights(model: nn.Module, directory: Path) -> None:
    """A checkpoint's weights into `model` (tied weights are checked once)."""
    state = dict(iter_tensors(checkpoint_files(directory)))
    model = unwrap(model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    shared = set(own) - set(dedupe(own))
    missing = [k for k in missing if k not in shared]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {directory} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def read_checkpoint(
    directory: Path, model: nn.Module, parts: dict[str, Any], optional: tuple[str, ...] = ()
) -> TrainerState:
    """Restore a checkpoint into `model` and `parts` (name -> object with load_state_dict, or None; the
    `optional` ones may be absent from the checkpoint) and the RNG states; return its trainer state."""
    if not (directory / "trainer_state.json").exists():
        raise FileNotFoundError(f"{directory} is not a trainer checkpoint (no trainer_state.json)")
    load_weights(model, directory)
    for name, part in parts.items():
        path = directory / f"{name}.pt"
        if part is not None and (path.exists() or name not in optional):
            part.load_state_dict(torch.load(path, weights_only=True))
    _set_rng_state(torch.load(directory / "rng_state.pt", weights_only=True))
    return TrainerState.load_from_json(directory / "trainer_state.json")


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    with contextlib.suppress(ImportError):
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
