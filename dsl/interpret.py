"""The config-expression interpreter: the value of a default, a repeat count or a `let` for given config
values. The language has no unbounded loops or calls, so evaluation always ends; sizes are bounded too."""

from __future__ import annotations

import operator
from collections.abc import Callable

from . import ir
from .errors import SpecError
from .library import FIELD_TYPES

MAX_REPEAT = 1024

_BINOPS: dict[str, Callable[[object, object], object]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "//": operator.floordiv,
    "%": operator.mod,
    "**": operator.pow,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def evaluate(expr: ir.Expr, env: dict[str, object]) -> object:
    """Evaluate a config expression against known values (used for defaults and size checks)."""
    if isinstance(expr, ir.Name):
        return env[expr.id]
    if isinstance(expr, ir.Number | ir.String | ir.Const):
        return expr.value
    if isinstance(expr, ir.ListExpr):
        return [evaluate(item, env) for item in expr.items]
    if isinstance(expr, ir.Comprehension):
        count = evaluate(expr.count, env)
        if not is_count(count):
            raise SpecError(f"range() of {count!r}; expected an int in 0..{MAX_REPEAT}", expr.count.pos)
        return [evaluate(expr.element, {**env, expr.var: i}) for i in range(count)]  # type: ignore[arg-type]
    if isinstance(expr, ir.Subscript):
        container, index = evaluate(expr.value, env), evaluate(expr.index, env)
        try:
            return container[index]  # type: ignore[index]
        except (IndexError, KeyError, TypeError) as err:
            raise SpecError(f"cannot index {container!r} with {index!r}: {err}", expr.pos) from None
    if isinstance(expr, ir.Unary):
        value = evaluate(expr.operand, env)
        if expr.op == "not":
            return not value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(f"cannot negate {value!r}", expr.pos)
        return -value
    if isinstance(expr, ir.IfExp):
        return evaluate(expr.body if evaluate(expr.test, env) else expr.orelse, env)
    if isinstance(expr, ir.BinOp):
        left = evaluate(expr.left, env)
        if expr.op == "and":
            return left and evaluate(expr.right, env)
        if expr.op == "or":
            return left or evaluate(expr.right, env)
        right = evaluate(expr.right, env)
        try:
            return _BINOPS[expr.op](left, right)
        except ZeroDivisionError:
            raise SpecError("division by zero for the default config", expr.pos) from None
        except (TypeError, OverflowError, ValueError) as err:
            raise SpecError(f"cannot compute `{expr.op}` here: {err}", expr.pos) from None
    if isinstance(expr, ir.Call) and expr.func == "rope":
        return {"rope_type": "default", **{k: evaluate(v, env) for k, v in expr.kwargs}}
    raise SpecError("not a config expression", expr.pos)


def is_count(value: object) -> bool:
    """An int a `repeat` or `range` may take."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_REPEAT


def type_ok(value: object, type_: ir.FieldType) -> bool:
    """Whether a config value has the field type `type_`."""
    if value is None:
        return type_.optional or type_.name == "any"
    return FIELD_TYPES[type_.name].check(value, type_.choices)
