"""Atomic writes. One file: a temporary name in the same folder, fsync, then rename over the target.
Several files that only make sense together (a checkpoint's config, weights and spec): `FolderSave`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import CheckpointError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes files 0600; saved files follow the umask
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(directory: Path) -> None:
    """Delete what a killed save left in `directory`: temporary files (`.<name>.<random>.tmp`) and
    staged files no journal names (`.<name>.<random>.staged`). Only saves call this: a concurrent
    save's files must not vanish under it because another process read the folder."""
    finish_interrupted_save(directory)
    for pattern in (".*.tmp", f".*{_STAGED}"):
        for leftover in directory.glob(pattern):
            if leftover.is_file():
                leftover.unlink(missing_ok=True)


SAVE_JOURNAL = ".specformer-save.json"
_STAGED = ".staged"


def _fsync_directory(directory: Path) -> None:
    """Make renames in `directory` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class FolderSave:
    """New versions of several files in one folder, switched in together: a kill at any moment leaves
    the folder as it was or as it will be, never a mix (new weights under an old config).

    Every file is first written under a staged name beside its target. `commit()` then writes a journal
    naming every rename and removal: that one atomic write is the commit point. The journal is applied
    (renames, then removals) and deleted. A kill before the journal exists leaves the old files untouched
    (the next save deletes the staged ones); a kill after it is finished by `finish_interrupted_save`,
    which every load of a local folder runs first.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self._token = secrets.token_hex(4)
        self._staged: dict[str, str] = {}

    def __enter__(self) -> FolderSave:
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.directory)
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:  # an error before the commit: the old files stay, the new ones go
            for staged in self._staged.values():
                (self.directory / staged).unlink(missing_ok=True)

    def path(self, name: str) -> Path:
        """Where to write the new `name` (a file name in the folder, not a path)."""
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"{name!r}: a FolderSave writes file names inside its folder, not paths")
        self._staged[name] = f".{name}.{self._token}{_STAGED}"
        return self.directory / self._staged[name]

    def write(self, name: str, writer: Callable[[Path], None]) -> None:
        """Run `writer(path)` to write the new `name`, then flush it to disk."""
        target = self.path(name)
        writer(target)
        with open(target, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(target, 0o666 & ~_umask())

    def write_text(self, name: str, text: str) -> None:
        self.write(name, lambda path: path.write_text(text, encoding="utf-8"))

    def commit(self, remove: Iterable[str] = ()) -> None:
        """Switch every staged file in and delete `remove` (old files the new state does not use)."""
        _fsync_directory(self.directory)
        journal = {"rename": self._staged, "remove": sorted(set(remove) - set(self._staged))}
        atomic_write_text(self.directory / SAVE_JOURNAL, json.dumps(journal, indent=1) + "\n")
        self._staged = {}  # committed: from here an error leaves the journal for the next load to finish
        _fsync_directory(self.directory)
        _apply(self.directory, journal)


def _apply(directory: Path, journal: dict[str, Any]) -> None:
    for name, staged in journal["rename"].items():
        if (directory / staged).exists():  # else renamed before the kill
            os.replace(directory / staged, directory / name)
    # an index goes before the files it names, so a reader never follows it to a missing shard
    for name in sorted(journal["remove"], key=lambda n: (not n.endswith(".json"), n)):
        (directory / name).unlink(missing_ok=True)
    _fsync_directory(directory)
    (directory / SAVE_JOURNAL).unlink(missing_ok=True)


def _plain_name(value: object) -> bool:
    return isinstance(value, str) and value not in ("", ".", "..") and Path(value).name == value


def finish_interrupted_save(directory: Path) -> None:
    """Complete a save that was killed after its commit point (idempotent; nothing to do without a
    journal). The journal is checked first: it only ever renames and removes files of this folder."""
    path = directory / SAVE_JOURNAL
    if not path.is_file():
        return
    journal = read_json_object(path, CheckpointError)
    renames, removes = journal.get("rename"), journal.get("remove")
    if not (
        isinstance(renames, dict)
        and isinstance(removes, list)
        and all(_plain_name(k) and _plain_name(v) and v.endswith(_STAGED) for k, v in renames.items())
        and all(_plain_name(n) for n in removes)
    ):
        raise CheckpointError(
            f"{path}: not a specformer save journal (`rename`: file name -> staged name, `remove`: "
            "file names in this folder); delete it if you did not expect it"
        )
    try:
        _apply(directory, journal)
    except OSError as err:
        raise CheckpointError(
            f"{directory}: a save was interrupted after its commit point and cannot be finished "
            f"({err}); open the folder once with write access to complete it"
        ) from None


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_with(target: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Run `writer(tmp_path)` and move the result into place."""
    with atomic_path(target) as tmp:
        writer(tmp)


MAX_JSON_BYTES = 64 * 2**20  # config.json, tokenizer_config.json, indexes: kilobytes in practice


def read_json_object(path: Path, error: type[Exception] = ValueError) -> dict:
    """A JSON object from `path`, read only if it is a regular file under MAX_JSON_BYTES; anything else
    (not a file, not UTF-8, malformed, nested past the parser's depth, not an object) raises `error`
    naming the file and, for malformed text, the line and column."""
    if not path.is_file():
        raise error(f"{path}: not a regular file" if path.exists() else f"{path}: missing")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise error(f"{path}: {size:,} bytes; a JSON metadata file is expected under {MAX_JSON_BYTES:,}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except (RecursionError, ValueError) as err:  # nesting past the parser's depth; 5,000-digit numbers
        raise error(f"{path}: JSON this library does not read ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
