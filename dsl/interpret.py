"""The config-expression interpreter: the value of a default, a repeat count or a `let` for given config
values. The language has no unbounded loops or calls, so evaluation always ends; sizes are bounded too."""

from __future__ import annotations

import operator
from collections import ChainMap
from collections.abc import Callable, Mapping

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
    "in": lambda item, items: operator.contains(items, item),
    "not in": lambda item, items: not operator.contains(items, item),
}


# What one evaluation may cost: a spec is untrusted input, and `2 ** 2 ** 40` or nested comprehensions
# must fail at once with a clear error rather than take the machine's time and memory.
MAX_STEPS = 100_000  # expression nodes evaluated, comprehension elements included
MAX_INT_BITS = 4096  # integers beyond this are no model size
MAX_ITEMS = 100_000  # list and string lengths


def evaluate(expr: ir.Expr, env: Mapping[str, object]) -> object:
    """Evaluate a config expression against known values (used for defaults and size checks)."""
    return _Evaluation().run(expr, env)


class _Evaluation:
    def __init__(self) -> None:
        self.steps = 0

    def run(self, expr: ir.Expr, env: Mapping[str, object]) -> object:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise SpecError(
                f"this config expression takes more than {MAX_STEPS:,} steps to evaluate", expr.pos
            )
        value = self._value(expr, env)
        _check_size(value, expr.pos)
        return value

    def _value(self, expr: ir.Expr, env: Mapping[str, object]) -> object:
        if isinstance(expr, ir.Name):
            return env[expr.id]
        if isinstance(expr, ir.Number | ir.String | ir.Const):
            return expr.value
        if isinstance(expr, ir.ListExpr):
            return [self.run(item, env) for item in expr.items]
        if isinstance(expr, ir.Comprehension):
            count = self.run(expr.count, env)
            if not is_count(count):
                raise SpecError(f"range() of {count!r}; expected an int in 0..{MAX_REPEAT}", expr.count.pos)
            return [self.run(expr.element, ChainMap({expr.var: i}, env)) for i in range(count)]  # type: ignore[arg-type]
        if isinstance(expr, ir.Subscript):
            container, index = self.run(expr.value, env), self.run(expr.index, env)
            try:
                return container[index]  # type: ignore[index]
            except (IndexError, KeyError, TypeError) as err:
                raise SpecError(f"cannot index {container!r} with {index!r}: {err}", expr.pos) from None
        if isinstance(expr, ir.Unary):
            value = self.run(expr.operand, env)
            if expr.op == "not":
                return not value
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SpecError(f"cannot negate {value!r}", expr.pos)
            return -value
        if isinstance(expr, ir.IfExp):
            return self.run(expr.body if self.run(expr.test, env) else expr.orelse, env)
        if isinstance(expr, ir.BinOp):
            left = self.run(expr.left, env)
            if expr.op == "and":
                return left and self.run(expr.right, env)
            if expr.op == "or":
                return left or self.run(expr.right, env)
            right = self.run(expr.right, env)
            _check_operands(expr, left, right)
            try:
                return _BINOPS[expr.op](left, right)
            except ZeroDivisionError:
                raise SpecError("division by zero for the default config", expr.pos) from None
            except (TypeError, OverflowError, ValueError) as err:
                raise SpecError(f"cannot compute `{expr.op}` here: {err}", expr.pos) from None
        if isinstance(expr, ir.Call) and expr.func == "rope":
            if any(isinstance(v, ir.Call) for _, v in expr.kwargs):  # tables per layer kind
                return {k: self.run(v, env) for k, v in expr.kwargs}
            names = {"theta": "rope_theta", "partial": "partial_rotary_factor"}
            values = {names[k]: self.run(v, env) for k, v in expr.kwargs if k in names}  # not the `*_key`s
            return {"rope_type": "default", **values}
        raise SpecError("not a config expression", expr.pos)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_operands(expr: ir.BinOp, left: object, right: object) -> None:
    """Refuse, before computing it, a result too big to hold: a huge power or a repeated sequence."""
    power = expr.op == "**" and _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1  # type: ignore[operator]
    # (bits - 1) * exponent is a lower bound of the result's size: past the limit, nothing is computed
    if power and right * (abs(left).bit_length() - 1) > MAX_INT_BITS:  # type: ignore[union-attr, operator]
        raise SpecError(f"`{left} ** {right}` is larger than a config value can be", expr.pos)
    if expr.op == "*":
        for sequence, times in ((left, right), (right, left)):
            if isinstance(sequence, list | str) and _is_int(times) and len(sequence) * times > MAX_ITEMS:  # type: ignore[operator]
                raise SpecError(f"this `*` makes a sequence of more than {MAX_ITEMS:,} items", expr.pos)


def _check_size(value: object, pos: ir.Pos) -> None:
    if _is_int(value) and value.bit_length() > MAX_INT_BITS:  # type: ignore[union-attr]
        raise SpecError(
            f"an integer of more than {MAX_INT_BITS} bits is larger than a config value can be", pos
        )
    if isinstance(value, list | str) and len(value) > MAX_ITEMS:
        raise SpecError(
            f"a sequence of more than {MAX_ITEMS:,} items is larger than a config value can be", pos
        )


def is_count(value: object) -> bool:
    """An int a `repeat` or `range` may take."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_REPEAT


def type_ok(value: object, type_: ir.FieldType) -> bool:
    """Whether a config value has the field type `type_`."""
    if value is None:
        return type_.optional or type_.name == "any"
    return FIELD_TYPES[type_.name].check(value, type_.choices)
