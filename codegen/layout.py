"""Line layout for generated code, matching what `ruff format` would produce for the shapes we emit."""

from __future__ import annotations

LINE_LENGTH = 110
INDENT = "    "


def split_args(args: str) -> list[str]:
    """Split a comma-separated argument list at top-level commas only."""
    parts, depth, start, quote = [], 0, 0, False
    for i, ch in enumerate(args):
        if ch == '"':
            quote = not quote
        elif quote:
            continue
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(args[start:i].strip())
            start = i + 1
    tail = args[start:].strip()
    if tail:
        parts.append(tail)
    return parts


def call_lines(indent: str, head: str, args: list[str], tail: str = ")") -> list[str]:
    """`head` ends with an opening bracket; lay out `head + args + tail` like ruff: one line if it fits,
    else the arguments on one indented line, else one argument per line with a trailing comma."""
    flat = f"{indent}{head}{', '.join(args)}{tail}"
    if len(flat) <= LINE_LENGTH or not args:
        return [flat]
    inner = f"{indent}{INDENT}{', '.join(args)}"
    if len(inner) <= LINE_LENGTH:
        return [f"{indent}{head}", inner, f"{indent}{tail}"]
    return [f"{indent}{head}", *(f"{indent}{INDENT}{a}," for a in args), f"{indent}{tail}"]


def statement_lines(indent: str, text: str) -> list[str]:
    """Lay out one statement. Long statements whose value is a single call are wrapped at that call."""
    line = indent + text
    if len(line) <= LINE_LENGTH:
        return [line]
    lhs, eq, rhs = text.partition(" = ")
    if eq and not text.endswith(")") and "(" not in lhs:
        # ruff wraps a long right-hand side in parentheses
        return [f"{indent}{lhs} = (", f"{indent}{INDENT}{rhs}", f"{indent})"]
    if not text.endswith(")"):
        return [line]
    depth = 0
    for i in range(len(text) - 1, -1, -1):
        ch = text[i]
        if ch == ")":
            depth += 1
        elif ch == "(":
            depth -= 1
            if depth == 0:
                return call_lines(indent, text[: i + 1], split_args(text[i + 1 : -1]))
    return [line]
