"""IR expressions -> Python source.

Only the closed set of IR node types can be emitted, names are already validated identifiers and string
literals cannot contain quotes or backslashes (the grammar forbids them), so the output can only be the
Python the language means.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from specformer.dsl import ir

# Python operator precedence, low to high.
_PRECEDENCE = {
    "if": 0,
    "or": 1,
    "and": 2,
    "not": 3,
    "==": 4,
    "!=": 4,
    "<": 4,
    "<=": 4,
    ">": 4,
    ">=": 4,
    "in": 4,
    "not in": 4,
    "+": 5,
    "-": 5,
    "*": 6,
    "/": 6,
    "//": 6,
    "%": 6,
    "neg": 7,
    "**": 8,
}
_ATOM = 9
_SIMPLE = re.compile(r"^-?[\w.]+$")

NameFn = Callable[[str], str]
CallFn = Callable[[ir.Call], str]


def _precedence(expr: ir.Expr) -> int:
    if isinstance(expr, ir.BinOp):
        return _PRECEDENCE[expr.op]
    if isinstance(expr, ir.Unary):
        return _PRECEDENCE["neg" if expr.op == "-" else "not"]
    if isinstance(expr, ir.IfExp):
        return _PRECEDENCE["if"]
    return _ATOM


class ExprEmitter:
    """Emits expressions; `name` maps a spec name to its Python spelling, `call` emits calls."""

    def __init__(self, name: NameFn, call: CallFn) -> None:
        self.name = name
        self.call = call
        # A hook that may emit a binary operation specially (e.g. act(gate) * up as one fused call).
        self.binop: Callable[[ir.BinOp], str | None] = lambda _: None

    def __call__(self, expr: ir.Expr) -> str:
        return self.emit(expr)

    def emit(self, expr: ir.Expr) -> str:
        if isinstance(expr, ir.Name):
            return self.name(expr.id)
        if isinstance(expr, ir.Number):
            return _number(expr)
        if isinstance(expr, ir.String):
            return json.dumps(expr.value)
        if isinstance(expr, ir.Const):
            return repr(expr.value)
        if isinstance(expr, ir.ListExpr):
            return "[" + ", ".join(self.emit(item) for item in expr.items) + "]"
        if isinstance(expr, ir.Call):
            return self.call(expr)
        if isinstance(expr, ir.Subscript):
            return f"{self._wrap(expr.value, _ATOM, right=False)}[{self.emit(expr.index)}]"
        if isinstance(expr, ir.Comprehension):
            outer = self.name
            self.name = lambda n: n if n == expr.var else outer(n)  # the loop variable is a plain local
            try:
                element = self.emit(expr.element)
            finally:
                self.name = outer
            return f"[{element} for {expr.var} in range({self.emit(expr.count)})]"
        if isinstance(expr, ir.Unary):
            operand = self._wrap(expr.operand, _precedence(expr), right=True)
            return f"-{operand}" if expr.op == "-" else f"not {operand}"
        if isinstance(expr, ir.IfExp):
            body = self._wrap(expr.body, 1, right=False)
            test = self._wrap(expr.test, 1, right=False)
            return f"{body} if {test} else {self._wrap(expr.orelse, 0, right=True)}"
        if isinstance(expr, ir.BinOp):
            special = self.binop(expr)
            if special is not None:
                return special
            prec = _PRECEDENCE[expr.op]
            right_assoc = expr.op == "**"
            left = self._wrap(expr.left, prec + (1 if right_assoc else 0), right=False)
            right = self._wrap(expr.right, prec + (0 if right_assoc else 1), right=True)
            if expr.op in ("==", "!=") and (_is_none(expr.left) or _is_none(expr.right)):
                return f"{left} {'is' if expr.op == '==' else 'is not'} {right}"  # identity, as PEP 8 asks
            if expr.op == "**" and _SIMPLE.match(left) and _SIMPLE.match(right):
                return f"{left}**{right}"  # ruff hugs `**` between simple operands
            return f"{left} {expr.op} {right}"
        raise TypeError(f"cannot emit {type(expr).__name__}")  # pragma: no cover - the IR is closed

    def _wrap(self, expr: ir.Expr, minimum: int, right: bool) -> str:
        text = self.emit(expr)
        return f"({text})" if _precedence(expr) < minimum else text


def _is_none(expr: ir.Expr) -> bool:
    return isinstance(expr, ir.Const) and expr.value is None


def _number(expr: ir.Number) -> str:
    text = expr.text
    if isinstance(expr.value, int):
        return str(expr.value)  # `01` is not a Python literal
    if isinstance(expr.value, float):
        # Canonical spelling: `1e-6` stays, `.5` becomes `0.5`, `5.` becomes `5.0`.
        if text.startswith("."):
            text = "0" + text
        if text.endswith("."):
            text += "0"
    return text
