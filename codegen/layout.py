"""Line layout for generated code: what `ruff format` would produce for the statements we emit.

A statement that fits in `LINE_LENGTH` stays on one line. Otherwise, like black and ruff:
- a right-hand side ending in brackets (a call, a list) with at most one top-level operator is split
  inside its last bracket pair (`x + f(`, args, `)`);
- any other right-hand side is wrapped in parentheses;
- the inside of a bracket pair goes on one indented line if it fits, else it is split at its loosest
  top-level delimiter (comprehension `for`, comma, `if`/`else`, `or`, `and`, comparison, `+`/`-`, ...),
  one piece per line, each piece split again if it is still too long.
"""

from __future__ import annotations

import io
import keyword
import tokenize

LINE_LENGTH = 110
INDENT = "    "

_OPEN, _CLOSE = "([{", ")]}"
# Black's delimiter priorities: a line is split at its highest-priority top-level delimiter.
_PRIORITY = {
    "for": 20,
    ",": 18,
    "if": 16,
    "else": 16,
    "or": 14,
    "and": 13,
    "not": 12,
    "in": 10,
    "==": 10,
    "!=": 10,
    "<": 10,
    "<=": 10,
    ">": 10,
    ">=": 10,
    "is": 10,
    "+": 5,
    "-": 5,
    "*": 4,
    "/": 4,
    "//": 4,
    "%": 4,
    "**": 1,
}


def _tokens(text: str) -> list[tuple[str, int, int]]:
    """(token text, start column, end column) for a single-line expression."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.INDENT, tokenize.DEDENT):
            continue
        out.append((tok.string, tok.start[1], tok.end[1]))
    return out


def _top_level_delimiters(text: str) -> list[tuple[int, int, str]]:
    """(priority, column, token) of every delimiter outside brackets."""
    found = []
    depth = 0
    tokens = _tokens(text)
    for i, (tok, start, _) in enumerate(tokens):
        if tok in _OPEN:
            depth += 1
        elif tok in _CLOSE:
            depth -= 1
        elif depth == 0 and tok in _PRIORITY:
            if tok == "-" and (i == 0 or tokens[i - 1][0] in _PRIORITY or tokens[i - 1][0] in _OPEN):
                continue  # unary minus
            if tok == "not" and i + 1 < len(tokens) and tokens[i - 1][0] == "is":
                continue  # `is not` splits at `is`
            if tok == "in" and i > 0 and tokens[i - 1][0] == "not":
                continue  # `not in` splits at `not`
            found.append((_PRIORITY[tok], start, tok))
    return found


def _split_points(text: str) -> list[tuple[int, int, str]]:
    """Top-level delimiters a line may be split at: not one that starts it (`else x`, `and y`), which
    belongs to the piece a split has already made."""
    return [d for d in _top_level_delimiters(text) if d[1] > 0]


def split_args(args: str) -> list[str]:
    """Split a comma-separated argument list at top-level commas only."""
    cuts = [col for prio, col, tok in _top_level_delimiters(args) if tok == ","]
    parts, start = [], 0
    for col in cuts:
        parts.append(args[start:col].strip())
        start = col + 1
    tail = args[start:].strip()
    if tail:
        parts.append(tail)
    return parts


def _content_lines(indent: str, content: str) -> list[str]:
    """The inside of a bracket pair, at `indent`."""
    if len(indent) + len(content) <= LINE_LENGTH:
        return [indent + content]
    delimiters = _split_points(content)
    if not delimiters:
        return _trailing_bracket_split(indent, content, "") or [indent + content]
    top = max(p for p, _, _ in delimiters)
    if top == _PRIORITY[","]:
        return [line for part in split_args(content) for line in _piece(indent, part + ",")]
    cuts = [col for p, col, _ in delimiters if p == top]
    pieces = [content[a:b].strip() for a, b in zip([0, *cuts], [*cuts, len(content)], strict=True)]
    return [line for piece in pieces if piece for line in _piece(indent, piece)]


def _piece(indent: str, piece: str) -> list[str]:
    """One piece of a split bracket: as is if it fits, else split at its trailing brackets or delimiters."""
    if len(indent) + len(piece) <= LINE_LENGTH:
        return [indent + piece]
    suffix = "," if piece.endswith(",") else ""
    body = piece[: -len(suffix)] if suffix else piece
    if _split_points(body):
        *lines, last = _content_lines(indent, body)
        return [*lines, last + suffix]
    return _trailing_bracket_split(indent, body, suffix) or [indent + piece]


def _trailing_bracket_split(indent: str, text: str, suffix: str) -> list[str] | None:
    """`head(content)` -> `head(`, content, `)`; None when `text` does not end in a bracket pair."""
    if not text or text[-1] not in _CLOSE:
        return None
    depth = 0
    for i in range(len(text) - 1, -1, -1):
        if text[i] in _CLOSE:
            depth += 1
        elif text[i] in _OPEN:
            depth -= 1
            if depth == 0:
                head, content = text[: i + 1], text[i + 1 : -1]
                if not content.strip():
                    return None
                inner = _content_lines(indent + INDENT, content)
                if (
                    len(inner) > 1
                    and _top_level_delimiters(content)
                    and max(p for p, _, _ in _top_level_delimiters(content)) == _PRIORITY[","]
                    and not inner[-1].endswith(",")
                ):
                    inner[-1] += ","  # the magic trailing comma of a one-per-line split
                return [indent + head, *inner, indent + text[-1] + suffix]
    return None


def _omits_parentheses(head: str, expr: str) -> bool:
    """Whether ruff splits `expr` (which ends in a bracket pair) inside its last brackets rather than
    wrapping it in parentheses: black's `can_omit_invisible_parens`. Yes without top-level operators, no
    with two of the loosest kind; with one, yes when that last pair opens within the line or after other
    brackets (`x + f(...)`, `(a) / (b)`)."""
    delimiters = _top_level_delimiters(expr)
    if not delimiters:
        return True
    top = max(p for p, _, _ in delimiters)
    if sum(1 for p, _, _ in delimiters if p == top) > 1:
        return False
    depth = 0
    for i in range(len(expr) - 1, -1, -1):  # the last pair's opening bracket
        if expr[i] in _CLOSE:
            depth += 1
        elif expr[i] in _OPEN:
            depth -= 1
            if depth == 0:
                return any(c in _OPEN for c in expr[:i]) or len(head) + i + 1 <= LINE_LENGTH
    return False


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


def _split_statement(text: str) -> tuple[str, str]:
    """(`lhs = ` or `return ` or '', the expression)."""
    if text.startswith("return "):
        return "return ", text[len("return ") :]
    depth = 0
    for tok, _, end in _tokens(text):
        if tok in _OPEN:
            depth += 1
        elif tok in _CLOSE:
            depth -= 1
        elif tok == "=" and depth == 0:
            return text[:end] + " ", text[end:].strip()
    return "", text


def statement_lines(indent: str, text: str) -> list[str]:
    """Lay out one simple statement (assignment, return or expression) as `ruff format` would."""
    line = indent + text
    if len(line) <= LINE_LENGTH or text.startswith("#") or text.endswith(":"):
        return [line]
    if "  # " in text and not text.rstrip().endswith('"'):
        text, _ = text.split("  # ", 1)  # a trailing shape comment is dropped rather than wrapped
        if len(indent + text) <= LINE_LENGTH:
            return [indent + text]
    lead, expr = _split_statement(text)
    split = _trailing_bracket_split(indent, lead + expr, "")
    if split is not None and len(split[0]) <= LINE_LENGTH and _omits_parentheses(indent + lead, expr):
        return split
    if keyword.iskeyword(expr.split(" ", 1)[0]) and expr.split(" ", 1)[0] not in (
        "not",
        "None",
        "True",
        "False",
    ):
        return [line]
    inner = _content_lines(indent + INDENT, expr)
    return [f"{indent}{lead}(", *inner, f"{indent})"]


def signature_lines(
    indent: str, name: str, params: list[str], returns: str, expand: bool = False
) -> list[str]:
    """`def name(params) -> returns:` as ruff lays it out; `expand` keeps one parameter per line (a magic
    trailing comma)."""
    head, tail = f"def {name}(", f") -> {returns}:"
    lines = call_lines(indent, head, params, tail)
    if expand or (len(lines) > 1 and not lines[-2].endswith(",")):
        # ruff puts each parameter on its own line once a signature is split
        return [f"{indent}{head}", *(f"{indent}{INDENT}{p}," for p in params), f"{indent}{tail}"]
    return lines


def table_lines(indent: str, head: str, entries: list[tuple[str, str]]) -> list[str]:
    """`head = {"key": "value", ...}`, one entry per line (the trailing comma keeps ruff's layout)."""
    return [f"{indent}{head} = {{", *(f'{indent}{INDENT}"{k}": "{v}",' for k, v in entries), f"{indent}}}"]


def import_lines(module: str, names: list[str]) -> list[str]:
    """`from module import names`, wrapped one name per line when it does not fit, as isort does."""
    line = f"from {module} import {', '.join(names)}"
    if len(line) <= LINE_LENGTH:
        return [line]
    return [f"from {module} import (", *(f"{INDENT}{n}," for n in names), ")"]
