"""Where a checkpoint lives: a local folder, or a Hugging Face hub id fetched into the local cache.

Only the files a model needs are fetched (`allow_patterns`). `local_files_only=True` or the environment
variable `HF_HUB_OFFLINE=1` never touches the network and reads the cache alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import CheckpointError
from .files import finish_interrupted_save

MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "*.sf",  # a spec carried by a checkpoint
]
LEGACY_WEIGHTS = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(
    path_or_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """A local folder holding the checkpoint's files."""
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        finish_interrupted_save(local)  # a save killed after its commit point is completed, not half-read
        return local
    name = str(path_or_id)
    if local.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CheckpointError(f"{name}: not a folder, and not a hub id of the form `owner/name`")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(f"{name}: loading from the hub needs huggingface_hub") from None
    patterns = allow_patterns or [*MODEL_FILES, *LEGACY_WEIGHTS]
    try:
        folder = snapshot_download(
            repo_id=name,
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            local_files_only=local_files_only or offline(),
            token=token,
            allow_patterns=patterns,
        )
    except LocalEntryNotFoundError:
        where = f" in {cache_dir}" if cache_dir else ""
        raise CheckpointError(
            f"{name}: not in the local hub cache{where} and the hub may not be reached "
            "(local_files_only or HF_HUB_OFFLINE=1); download it once with network access, or pass a folder"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{name}: no such repository on the hub (or it is private: pass `token=`)"
        ) from None
    except HfHubHTTPError as err:
        raise CheckpointError(f"{name}: the hub refused the download: {err}") from None
    return Path(folder)
