"""Reading spec files from disk and turning them into resolved, validated models."""

from __future__ import annotations

import hashlib
from pathlib import Path

from . import ir
from .comments import scan_comments
from .errors import SpecError
from .parser import parse
from .resolve import resolve
from .validate import validate

# Specs are small; a bound keeps a hostile file from costing parser time and memory.
MAX_SPEC_CHARS = 256_000
MAX_SPEC_BYTES = 4 * MAX_SPEC_CHARS  # UTF-8 takes at most four bytes a character


class SpecSet:
    """All models declared by a set of spec files; `extends` may cross files."""

    def __init__(self) -> None:
        self.sources: dict[str, str] = {}
        self.models: dict[str, ir.Model] = {}
        self.comments: dict[str, tuple[ir.Comment, ...]] = {}

    def add_text(self, text: str, file: str) -> tuple[str, ...]:
        if len(text) > MAX_SPEC_CHARS:
            raise SpecError(f"{file}: spec is {len(text)} characters; the limit is {MAX_SPEC_CHARS}")
        self.sources[file] = text
        try:
            models = parse(text, file)
        except SpecError as err:
            raise err.with_source(self.sources) from None
        except RecursionError:
            raise SpecError(f"{file}: an expression is nested too deeply to parse") from None
        self.comments[file] = scan_comments(text, file)
        for model in models:
            if model.name in self.models:
                other = self.models[model.name].pos
                raise SpecError(
                    f"model `{model.name}` is already declared at {other.file}:{other.line}", model.pos
                ).with_source(self.sources)
            self.models[model.name] = model
        return tuple(m.name for m in models)

    def add_file(self, path: str | Path, display: str | None = None) -> tuple[str, ...]:
        return self.add_text(read_spec(path, display), display or str(path))

    def resolved(self, name: str) -> ir.ResolvedModel:
        try:
            flat, lineage = resolve(name, self.models)
            facts = validate(flat)
        except SpecError as err:
            raise err.with_source(self.sources) from None
        except RecursionError:
            raise SpecError(f"model `{name}`: an expression is nested too deeply to check") from None
        files = tuple(dict.fromkeys(m.source_file for m in lineage))
        digest = hashlib.sha256()
        for file in sorted(files):
            digest.update(file.encode() + b"\0" + self.sources[file].encode() + b"\0")
        return ir.ResolvedModel(
            name=flat.name,
            model_type=flat.type_name,
            gguf=flat.gguf,
            stored_names=flat.stored_names,
            lineage=tuple(m.name for m in lineage),
            config=flat.config,
            blocks=flat.blocks,
            source_files=files,
            spec_hash=digest.hexdigest(),
            pos=flat.pos,
            comments=tuple(c for file in files for c in self.comments[file]),
            facts=facts,
        )

    def all_resolved(self) -> list[ir.ResolvedModel]:
        return [self.resolved(name) for name in self.models]


def read_spec(path: str | Path, display: str | None = None) -> str:
    """A spec file's text, read only if it is a regular file within the size limit, as UTF-8; anything
    else is a SpecError naming the file (and, for bad bytes, where they are)."""
    path = Path(path)
    shown = display or str(path)
    try:
        if not path.is_file():  # a directory, a FIFO or a device would block or fail part-way
            raise SpecError(f"{shown}: not a regular file; a spec is a text file")
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(f"{shown}: spec is {size:,} bytes; the limit is {MAX_SPEC_BYTES:,}")
        with open(path, "rb") as handle:
            data = handle.read(MAX_SPEC_BYTES + 1)
    except OSError as err:
        raise SpecError(f"{shown}: cannot read spec: {err.strerror or err}") from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"{shown}: spec is over {MAX_SPEC_BYTES:,} bytes, the limit")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        pos = ir.Pos(file=shown, line=line, column=column)
        raise SpecError(f"byte 0x{data[err.start]:02x} is not UTF-8; a spec is UTF-8 text", pos) from None


def load_dir(directory: str | Path, display_root: str | Path | None = None) -> SpecSet:
    """Every `*.sf` file in `directory`, sorted by name so results never depend on the file system."""
    directory = Path(directory)
    specs = SpecSet()
    for path in sorted(directory.glob("*.sf")):
        display = path.relative_to(display_root).as_posix() if display_root else path.as_posix()
        specs.add_file(path, display)
    return specs


def load_file(path: str | Path, search_dir: str | Path | None = None) -> tuple[SpecSet, tuple[str, ...]]:
    """One spec file, with the other specs of `search_dir` available to `extends`."""
    path = Path(path).resolve()
    specs = SpecSet()
    if search_dir is not None:
        for other in sorted(Path(search_dir).glob("*.sf")):
            if other.resolve() != path:
                specs.add_file(other, other.as_posix())
    names = specs.add_file(path, str(path))
    return specs, names
