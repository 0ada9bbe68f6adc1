"""Filling the library's spelling templates (`dsl.library`) with spelled arguments."""

from __future__ import annotations

import re

_HOLE = re.compile(r"\{(@?\w+)(!atom)?\}")
_OPTIONAL = re.compile(r"\[\[(.*?)\]\]")


def atom(text: str) -> str:
    """Parenthesise `text` unless it is safe to follow with `.attr` or `[...]`."""
    depth = 0
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and ch in " -+*/%<>=!":
            return f"({text})"
    return text


def fill(template: str, args: dict[str, str], given: set[str], context: dict[str, str]) -> str:
    """`template` with its holes filled: `args` maps parameter names to their spelling (defaults
    included), `given` names the arguments the spec wrote, `context` the context names (`@rope`...)."""

    def hole(match: re.Match[str]) -> str:
        name, as_atom = match.group(1), match.group(2)
        text = context[name[1:]] if name.startswith("@") else args[name]
        return atom(text) if as_atom else text

    def optional(match: re.Match[str]) -> str:
        names = [n for n, _ in _HOLE.findall(match.group(1)) if not n.startswith("@")]
        if all(n in given and args[n] != "None" for n in names):
            return _HOLE.sub(hole, match.group(1))
        return ""

    return _HOLE.sub(hole, _OPTIONAL.sub(optional, template))
