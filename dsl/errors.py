"""`SpecError`: every problem with a spec, pointing at `path:line:col` with the source line and a caret."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from .ir import Pos


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A `; did you mean `x`?` suffix for a misspelt name, or an empty string."""
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.75)
    return f"; did you mean `{close[0]}`?" if close else ""


class SpecformerError(Exception):
    """The base of every error specformer raises for bad input: catch this one to catch them all."""


class SpecError(SpecformerError):
    """A syntax or semantic error in a spec file."""

    def __init__(self, message: str, pos: Pos | None = None, source: str | None = None) -> None:
        self.message = message
        self.pos = pos
        self.source = source
        super().__init__(self.render())

    @property
    def line(self) -> int | None:
        return self.pos.line if self.pos else None

    @property
    def column(self) -> int | None:
        return self.pos.column if self.pos else None

    def render(self) -> str:
        if self.pos is None:
            return self.message
        text = f"{self.pos.file}:{self.pos.line}:{self.pos.column}: error: {self.message}"
        if self.source is not None:
            lines = self.source.splitlines()
            if 0 < self.pos.line <= len(lines):
                src = lines[self.pos.line - 1]
                text += f"\n    {src}\n    {' ' * (self.pos.column - 1)}^"
        return text

    def with_source(self, sources: dict[str, str]) -> SpecError:
        """The same error, quoting its line from `sources` (file name -> text) when it did not yet."""
        if self.source is not None or self.pos is None or self.pos.file not in sources:
            return self
        return SpecError(self.message, self.pos, sources[self.pos.file])
