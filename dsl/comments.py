"""Spec comments, kept so the generated code can carry them (`# Gemma scales the embedding ...`).

Comments never reach the parser's tree; they are scanned from the text and attached by line number.
Only printable characters survive, so a comment cannot end a line early in the generated Python.
"""

from __future__ import annotations

from . import ir


def scan_comments(text: str, file: str) -> tuple[ir.Comment, ...]:
    found: list[ir.Comment] = []
    for number, line in enumerate(text.split("\n"), start=1):
        in_string = False
        for column, char in enumerate(line, start=1):
            if char == '"':
                in_string = not in_string
            elif char == "#" and not in_string:
                body = "".join(c for c in line[column:] if c.isprintable()).strip()
                own_line = not line[: column - 1].strip()
                found.append(ir.Comment(file=file, line=number, column=column, text=body, own_line=own_line))
                break
    return tuple(found)


class CommentIndex:
    """Looks up the comment that documents a node: the comment lines right above it, or one at its end."""

    def __init__(self, comments: tuple[ir.Comment, ...]) -> None:
        self._by_line = {(c.file, c.line): c for c in comments}
        self._claimed: set[tuple[str, int]] = set()

    def take(self, pos: ir.Pos, above_only: bool = False) -> list[str]:
        """The comment text for the node at `pos`, once: a second node on the same line gets nothing."""
        key = (pos.file, pos.line)
        if key in self._claimed:
            return []
        self._claimed.add(key)
        lines: list[str] = []
        line = pos.line - 1
        while (pos.file, line) in self._by_line and self._by_line[(pos.file, line)].own_line:
            lines.insert(0, self._by_line[(pos.file, line)].text)
            line -= 1
        trailing = self._by_line.get(key)
        if trailing is not None and not trailing.own_line and not above_only:
            lines.append(trailing.text)
        return [text for text in lines if text]
