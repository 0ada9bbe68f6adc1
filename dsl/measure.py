"""How big a spec is: its declarations and statements, counted from the parse tree, not its lines.

Counting lines would reward cramming four fields onto one line; counting what a spec says does not.
A declaration is a config item, a submodule, `tie`, `parallel`, an option, an override or removal, a
block, backbone or head; a statement is one line of a forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from lark import Tree
from lark.exceptions import UnexpectedInput

from .errors import SpecError
from .parser import _lark, _syntax_error

# Parse-tree rules that declare one thing, or state one step of a forward.
_ITEMS = frozenset(
    {
        "model_type", "field_decl", "let_decl", "field_override", "field_remove", "alias", "option",
        "submodule", "tie", "parallel", "assign", "return_stmt", "override_module", "override_argument",
        "move_head", "remove_head", "remove_module", "gguf_rows",
    }
)  # fmt: skip
# Declarations that hold others (and so share a line with their first item, as in `forward(x) { ... }`).
_CONTAINERS = frozenset({"block", "backbone", "head", "override_forward", "gguf"})


@dataclass(frozen=True)
class SpecSize:
    file: str
    declarations: int  # including statements
    crowded_lines: tuple[int, ...]  # lines holding more than one item


def measure(text: str, file: str = "<spec>") -> SpecSize:
    """The size of one spec file."""
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as err:
        raise _syntax_error(err, text, file) from None
    lines: list[int] = []
    containers = 0
    for node in tree.iter_subtrees():
        if not isinstance(node, Tree):
            continue
        if node.data in _ITEMS:
            lines.append(node.meta.line)
        elif node.data in _CONTAINERS:
            containers += 1
    crowded = sorted({line for line in lines if lines.count(line) > 1})
    if not lines and not containers:
        raise SpecError(f"{file}: no declarations")
    return SpecSize(file=file, declarations=len(lines) + containers, crowded_lines=tuple(crowded))
