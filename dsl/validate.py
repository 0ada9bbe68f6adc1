"""Semantic checks on a flat model: names resolve, types agree, the module tree is finite, forwards are
well formed. Every failure is a `SpecError` at the offending node."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterator

from . import ir
from .errors import SpecError, did_you_mean
from .primitives import (
    ACTIVATIONS,
    BACKBONE_INPUTS,
    BASE_CONFIG_FIELDS,
    BUILTINS,
    PRIMITIVES,
    REQUIRED,
    TASKS,
    TYPES,
    Signature,
)

MAX_REPEAT = 1024

_BINOPS: dict[str, Callable] = {
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


def names_in(expr: ir.Expr) -> Iterator[ir.Name]:
    """Every `Name` an expression reads (call targets excluded)."""
    if isinstance(expr, ir.Name):
        yield expr
    elif isinstance(expr, ir.Unary):
        yield from names_in(expr.operand)
    elif isinstance(expr, ir.BinOp):
        yield from names_in(expr.left)
        yield from names_in(expr.right)
    elif isinstance(expr, ir.IfExp):
        for part in (expr.test, expr.body, expr.orelse):
            yield from names_in(part)
    elif isinstance(expr, ir.ListExpr):
        for item in expr.items:
            yield from names_in(item)
    elif isinstance(expr, ir.Call):
        for arg in (*expr.args, *(v for _, v in expr.kwargs)):
            yield from names_in(arg)


def evaluate(expr: ir.Expr, env: dict[str, object]) -> object:
    """Evaluate a config expression against known values (used for defaults and size checks)."""
    if isinstance(expr, ir.Name):
        return env[expr.id]
    if isinstance(expr, ir.Number | ir.String | ir.Const):
        return expr.value
    if isinstance(expr, ir.ListExpr):
        return [evaluate(item, env) for item in expr.items]
    if isinstance(expr, ir.Unary):
        value = evaluate(expr.operand, env)
        return (not value) if expr.op == "not" else -value  # type: ignore[operator]
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
        except (TypeError, OverflowError) as err:
            raise SpecError(f"cannot compute `{expr.op}` here: {err}", expr.pos) from None
    if isinstance(expr, ir.Call) and expr.func == "rope":
        return {"rope_type": "default", **{k: evaluate(v, env) for k, v in expr.kwargs}}
    raise SpecError("not a config expression", expr.pos)


def _type_ok(value: object, type_: ir.FieldType) -> bool:
    if value is None:
        return type_.optional or type_.name == "any"
    checks: dict[str, Callable[[object], bool]] = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "activation": lambda v: v in ACTIVATIONS,
        "rope": lambda v: isinstance(v, dict),
        "list": lambda v: isinstance(v, list),
        "dict": lambda v: isinstance(v, dict),
        "any": lambda v: True,
        "enum": lambda v: v in type_.choices,
    }
    return checks[type_.name](value)


class Validator:
    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.fields = {f.name: f for f in model.config.fields}
        self.aliases = {a.alias: a for a in model.config.aliases}
        self.blocks = {b.name: b for b in model.blocks}
        self.defaults: dict[str, object] = {}

    def error(self, message: str, pos: ir.Pos | None) -> SpecError:
        return SpecError(message, pos)

    # ---- config ----------------------------------------------------------------------------------
    def check_config(self) -> None:
        for field in self.model.config.fields:
            if field.type.name not in TYPES and field.type.name != "enum":
                hint = did_you_mean(field.type.name, TYPES)
                raise self.error(
                    f"unknown type `{field.type.name}` for field `{field.name}`{hint}", field.pos
                )
            if field.name in BASE_CONFIG_FIELDS:
                raise self.error(
                    f"`{field.name}` is provided by every config and cannot be redeclared", field.pos
                )
        for alias in self.model.config.aliases:
            if alias.target not in self.fields:
                hint = did_you_mean(alias.target, self.fields)
                raise self.error(
                    f"alias `{alias.alias}` points to unknown field `{alias.target}`{hint}", alias.pos
                )
            if alias.alias in self.fields:
                raise self.error(f"alias `{alias.alias}` collides with a field of that name", alias.pos)
        for name in self._field_order():
            field = self.fields[name]
            if field.default is None:
                continue
            value = evaluate(self._config_literal(field), self.defaults)
            if not _type_ok(value, field.type):
                raise self.error(
                    f"default of `{field.name}` is {value!r}, which is not of type `{field.type}`",
                    field.default.pos,
                )
            self.defaults[name] = value

    def _config_literal(self, field: ir.ConfigField) -> ir.Expr:
        """Activation and enum defaults are written as bare names (`hidden_act: activation = silu`)."""
        default = field.default
        assert default is not None
        if isinstance(default, ir.Name) and field.type.name in ("activation", "enum"):
            choices = ACTIVATIONS if field.type.name == "activation" else field.type.choices
            if default.id not in choices:
                hint = did_you_mean(default.id, choices)
                raise self.error(f"`{default.id}` is not a known {field.type.name}{hint}", default.pos)
            return ir.String(value=default.id, pos=default.pos)
        if isinstance(default, ir.Call):
            if default.func != "rope" or field.type.name != "rope":
                raise self.error(f"`{default.func}(...)` cannot be a config default", default.pos)
            allowed = ("theta",)
            for key, _ in default.kwargs:
                if key not in allowed:
                    raise self.error(
                        f"unknown rope parameter `{key}`{did_you_mean(key, allowed)}", default.pos
                    )
            if default.args:
                raise self.error("rope(...) takes keyword arguments only", default.pos)
        return default

    def _field_order(self) -> list[str]:
        """Fields in dependency order, rejecting unknown names and cycles."""
        order: list[str] = []
        state: dict[str, str] = {}

        def visit(name: str, trail: list[str]) -> None:
            if state.get(name) == "done":
                return
            if state.get(name) == "active":
                cycle = " -> ".join([*trail[trail.index(name) :], name])
                raise self.error(f"config defaults depend on each other: {cycle}", self.fields[name].pos)
            state[name] = "active"
            field = self.fields[name]
            if field.default is not None and not self._is_bare_literal(field):
                for ref in names_in(field.default):
                    if ref.id not in self.fields:
                        hint = did_you_mean(ref.id, self.fields)
                        raise self.error(f"unknown field `{ref.id}`{hint}", ref.pos)
                    if self.fields[ref.id].default is None:
                        raise self.error(
                            f"`{ref.id}` has no default, so `{name}` cannot default to it", ref.pos
                        )
                    visit(ref.id, [*trail, name])
            state[name] = "done"
            order.append(name)

        for name in self.fields:
            visit(name, [])
        return order

    def _is_bare_literal(self, field: ir.ConfigField) -> bool:
        return isinstance(field.default, ir.Name) and field.type.name in ("activation", "enum")

    def check_config_expr(self, expr: ir.Expr, layer_scope: bool, what: str) -> None:
        """An expression over config values, as used in constructor arguments and tie conditions."""
        for ref in names_in(expr):
            if ref.id == "layer_idx" and layer_scope:
                continue
            if ref.id in self.fields or ref.id in BASE_CONFIG_FIELDS or ref.id in self.aliases:
                continue
            hint = did_you_mean(ref.id, [*self.fields, *BASE_CONFIG_FIELDS])
            raise self.error(f"unknown field `{ref.id}` in {what}{hint}", ref.pos)
        if isinstance(expr, ir.Call):
            raise self.error(f"calls are not allowed in {what}", expr.pos)
        for node in walk(expr):
            if isinstance(node, ir.Call):
                raise self.error(f"calls are not allowed in {what}", node.pos)

    # ---- module tree -----------------------------------------------------------------------------
    def check_blocks(self) -> None:
        backbones = [b for b in self.model.blocks if b.role == "backbone"]
        if len(backbones) != 1:
            raise self.error(f"model `{self.model.name}` needs exactly one backbone", self.model.pos)
        layer_scoped = self._layer_scoped_blocks()
        for block in self.model.blocks:
            for sub in block.submodules:
                self._check_submodule(block, sub, block.name in layer_scoped)
            for tie in block.ties:
                self._check_tie(block, tie)
            if block.role == "head" and block.task not in TASKS:
                hint = did_you_mean(block.task or "", TASKS)
                raise self.error(f"unknown task `{block.task}` for head `{block.name}`{hint}", block.pos)
        self._check_acyclic()

    def _layer_scoped_blocks(self) -> set[str]:
        """Blocks built once per layer (under a `repeat`): only these may read `layer_idx`."""
        scoped: set[str] = set()

        def mark(name: str) -> None:
            if name in scoped or name not in self.blocks:
                return
            scoped.add(name)
            for sub in self.blocks[name].submodules:
                if sub.kind == "block":
                    mark(sub.target)

        for block in self.model.blocks:
            for sub in block.submodules:
                if sub.kind == "repeat":
                    mark(sub.target)
        return scoped

    def _check_submodule(self, block: ir.Block, sub: ir.Submodule, layer_scope: bool) -> None:
        if sub.kind == "primitive":
            signature = PRIMITIVES.get(sub.target)
            if signature is None:
                if sub.target in self.blocks:
                    raise self.error(f"`{sub.target}` is a block: write `{sub.name} = {sub.target}`", sub.pos)
                hint = did_you_mean(sub.target, [*PRIMITIVES, *self.blocks])
                raise self.error(f"unknown primitive `{sub.target}`{hint}", sub.pos)
            self.bind(signature, sub.args, sub.kwargs, sub.pos)
            for arg in (*sub.args, *(v for _, v in sub.kwargs)):
                self.check_config_expr(arg, layer_scope, f"the arguments of `{sub.name}`")
            if sub.target == "Rotary" and block.role != "backbone":
                raise self.error("Rotary belongs in the backbone, which computes positions once", sub.pos)
            return
        target = self.blocks.get(sub.target)
        if target is None:
            hint = did_you_mean(sub.target, [*self.blocks, *PRIMITIVES])
            raise self.error(f"unknown block `{sub.target}`{hint}", sub.pos)
        if target.role != "block":
            raise self.error(f"`{sub.target}` is a {target.role} and cannot be used as a submodule", sub.pos)
        if sub.kind == "repeat":
            assert sub.count is not None
            self.check_config_expr(sub.count, False, "a repeat count")
            count = evaluate(sub.count, self.defaults)
            if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_REPEAT:
                raise self.error(
                    f"repeat count is {count!r} for the default config; expected an int in 0..{MAX_REPEAT}",
                    sub.count.pos,
                )

    def bind(
        self, signature: Signature, args: tuple, kwargs: tuple, pos: ir.Pos
    ) -> dict[str, ir.Expr | object]:
        """Match call arguments to a signature, as Python would, with errors a spec author can act on."""
        if len(args) > len(signature.params):
            raise self.error(
                f"`{signature.name}` takes at most {len(signature.params)} positional arguments "
                f"({', '.join(signature.names)}), got {len(args)}",
                pos,
            )
        bound: dict[str, ir.Expr | object] = dict(zip(signature.names, args, strict=False))
        for key, value in kwargs:
            if key not in signature.names:
                hint = did_you_mean(key, signature.names)
                raise self.error(f"`{signature.name}` has no parameter `{key}`{hint}", value.pos)
            if key in bound:
                raise self.error(f"`{signature.name}` got `{key}` twice", value.pos)
            bound[key] = value
        for param in signature.params:
            if param.name not in bound:
                if param.default is REQUIRED:
                    raise self.error(f"`{signature.name}` is missing its `{param.name}` argument", pos)
                bound[param.name] = param.default
        return bound

    def _check_tie(self, block: ir.Block, tie: ir.Tie) -> None:
        own = block.submodule(tie.name)
        if own is None or own.kind != "primitive":
            raise self.error(f"`tie {tie.name}`: `{block.name}` has no such primitive submodule", tie.pos)
        backbone = self.model.backbone
        path = list(tie.target)
        if backbone is None or path[0] != backbone.attr:
            raise self.error(
                f"tie targets start at the backbone: `{backbone.attr if backbone else '?'}.…`", tie.pos
            )
        current: ir.Block = backbone
        for i, part in enumerate(path[1:], start=1):
            sub = current.submodule(part)
            if sub is None:
                hint = did_you_mean(part, [s.name for s in current.submodules])
                raise self.error(f"`{'.'.join(path[: i + 1])}` does not exist{hint}", tie.pos)
            if sub.kind == "primitive":
                if i != len(path) - 1:
                    raise self.error(
                        f"`{'.'.join(path[: i + 1])}` is a primitive with no submodules", tie.pos
                    )
                if sub.target != own.target and {sub.target, own.target} != {"Linear", "Embedding"}:
                    raise self.error(f"cannot tie a {own.target} to a {sub.target}", tie.pos)
                break
            if sub.kind == "repeat":
                raise self.error("cannot tie into a repeated stack", tie.pos)
            current = self.blocks[sub.target]
        else:
            raise self.error(f"`{'.'.join(path)}` is not a primitive submodule", tie.pos)
        if tie.condition is not None:
            self.check_config_expr(tie.condition, False, "a tie condition")

    def _check_acyclic(self) -> None:
        state: dict[str, str] = {}

        def visit(name: str, trail: list[str]) -> None:
            if state.get(name) == "done":
                return
            if state.get(name) == "active":
                cycle = " -> ".join([*trail[trail.index(name) :], name])
                raise self.error(f"blocks contain each other: {cycle}", self.blocks[name].pos)
            state[name] = "active"
            for sub in self.blocks[name].submodules:
                if sub.kind != "primitive":
                    visit(sub.target, [*trail, name])
            state[name] = "done"

        for name in self.blocks:
            visit(name, [])

    # ---- dataflow --------------------------------------------------------------------------------
    def check_forwards(self) -> None:
        for block in self.model.blocks:
            if block.forward is None:
                raise self.error(f"{block.role} `{block.name}` has no forward", block.pos)
            self._check_forward(block, block.forward)

    def _check_forward(self, block: ir.Block, forward: ir.Forward) -> None:
        if not forward.params:
            raise self.error("a forward takes at least one input", forward.pos)
        if block.role == "backbone":
            for param in forward.params:
                if param not in BACKBONE_INPUTS:
                    hint = did_you_mean(param, BACKBONE_INPUTS)
                    raise self.error(
                        f"a backbone's inputs are {', '.join(BACKBONE_INPUTS)}; got `{param}`{hint}",
                        forward.pos,
                    )
            if "input_ids" not in forward.params:
                raise self.error("a backbone's forward takes `input_ids`", forward.pos)
        if block.role == "head" and len(forward.params) != 1:
            raise self.error("a head's forward takes one input: the backbone's output", forward.pos)
        if len(set(forward.params)) != len(forward.params):
            raise self.error("a forward input is named twice", forward.pos)
        scope = _ForwardScope(self, block, set(forward.params))
        for i, stmt in enumerate(forward.body):
            if isinstance(stmt, ir.Return):
                if i != len(forward.body) - 1:
                    raise self.error("statements after `return` never run", forward.body[i + 1].pos)
                scope.tensor(stmt.value)
            else:
                scope.assign(stmt)
        if not forward.body or not isinstance(forward.body[-1], ir.Return):
            raise self.error(f"the forward of `{block.name}` must end with `return`", forward.pos)

    def check_model_type(self) -> None:
        model_type = self.model.model_type or self.model.name.lower()
        if not re.fullmatch(r"[a-z][a-z0-9_]*", model_type):
            raise self.error(
                f"model_type `{model_type}` must be lower-case letters, digits and underscores",
                self.model.pos,
            )

    def run(self) -> dict[str, object]:
        self.check_model_type()
        self.check_config()
        self.check_blocks()
        self.check_forwards()
        return self.defaults


class _ForwardScope:
    """Tracks what each name in a forward is (a tensor local, a config scalar) and checks calls."""

    def __init__(self, validator: Validator, block: ir.Block, params: set[str]) -> None:
        self.v = validator
        self.block = block
        self.locals = set(params)
        self.subs = {s.name: s for s in block.submodules}

    def assign(self, stmt: ir.Assign) -> None:
        value = stmt.value
        if isinstance(value, ir.Call) and value.func in self.subs and self.subs[value.func].kind == "repeat":
            if len(stmt.targets) != 1 or len(value.args) != 1 or value.kwargs:
                raise self.v.error(f"a repeated stack is applied as `x = {value.func}(x)`", value.pos)
            self.tensor(value.args[0])
            self.locals.update(stmt.targets)
            return
        returns = self.tensor(value)
        if returns != len(stmt.targets):
            raise self.v.error(
                f"this produces {returns} value(s) but {len(stmt.targets)} are assigned", stmt.pos
            )
        for target in stmt.targets:
            if target in self.v.fields or target in self.subs:
                raise self.v.error(f"`{target}` is already a config field or submodule", stmt.pos)
        self.locals.update(stmt.targets)

    def scalar(self, expr: ir.Expr) -> None:
        for node in walk(expr):
            if isinstance(node, ir.Call):
                raise self.v.error("calls are not allowed in a config expression", node.pos)
            if isinstance(node, ir.Name) and node.id in self.locals:
                raise self.v.error(f"`{node.id}` is a tensor; a config value is expected here", node.pos)
        self.v.check_config_expr(expr, True, "this expression")

    def tensor(self, expr: ir.Expr) -> int:
        """Check an expression that yields tensors; return how many."""
        if isinstance(expr, ir.Name):
            if expr.id in self.locals:
                return 1
            if expr.id in self.subs:
                raise self.v.error(f"`{expr.id}` is a submodule: call it, `{expr.id}(x)`", expr.pos)
            hint = did_you_mean(expr.id, [*self.locals, *self.v.fields])
            if expr.id in self.v.fields:
                raise self.v.error(f"`{expr.id}` is a config value, not a tensor", expr.pos)
            raise self.v.error(f"unknown name `{expr.id}`{hint}", expr.pos)
        if isinstance(expr, ir.BinOp) and expr.op in ("+", "-", "*", "/"):
            counts = [self._operand(side) for side in (expr.left, expr.right)]
            if counts == [0, 0]:
                raise self.v.error("expected a tensor expression", expr.pos)
            return 1
        if isinstance(expr, ir.Unary) and expr.op == "-":
            return self.tensor(expr.operand)
        if isinstance(expr, ir.IfExp):
            self.scalar(expr.test)
            left, right = self.tensor(expr.body), self.tensor(expr.orelse)
            if left != right:
                raise self.v.error("both branches must produce the same number of values", expr.pos)
            return left
        if isinstance(expr, ir.Call):
            return self.call(expr)
        raise self.v.error("expected a tensor expression", expr.pos)

    def _operand(self, expr: ir.Expr) -> int:
        """1 for a tensor operand, 0 for a config scalar."""
        if any(isinstance(n, ir.Name) and n.id in self.locals for n in walk(expr)) or any(
            isinstance(n, ir.Call) for n in walk(expr)
        ):
            return self.tensor(expr)
        self.scalar(expr)
        return 0

    def call(self, call: ir.Call) -> int:
        sub = self.subs.get(call.func)
        if sub is not None:
            if sub.kind == "repeat":
                raise self.v.error(
                    f"a repeated stack is applied in its own statement: `x = {sub.name}(x)`", call.pos
                )
            if sub.kind == "primitive" and sub.target == "Rotary":
                raise self.v.error("the rotary tables are applied with `rotary(q, k)` in attention", call.pos)
            if call.kwargs:
                raise self.v.error("submodules take tensors as positional arguments only", call.pos)
            if sub.kind == "block":
                expected = (
                    len(self.v.blocks[sub.target].forward.params) if self.v.blocks[sub.target].forward else 1
                )
            else:
                expected = 1
            if len(call.args) != expected:
                raise self.v.error(
                    f"`{call.func}` takes {expected} tensor input(s), got {len(call.args)}", call.pos
                )
            for arg in call.args:
                if self.tensor(arg) != 1:
                    raise self.v.error("each input must be a single tensor", arg.pos)
            return 1
        builtin = BUILTINS.get(call.func)
        if builtin is not None:
            bound = self.v.bind(builtin.signature, call.args, call.kwargs, call.pos)
            for i, name in enumerate(builtin.signature.names):
                value = bound[name]
                if not isinstance(value, ir.Node):
                    continue
                if i < builtin.tensor_params:
                    if self.tensor(value) != 1:  # type: ignore[arg-type]
                        raise self.v.error("each input must be a single tensor", value.pos)  # type: ignore[union-attr]
                else:
                    self.scalar(value)  # type: ignore[arg-type]
            if "input_ids" in builtin.needs and self.block.role != "head":
                raise self.v.error(
                    f"`{call.func}` pools a head's input and is only available in heads", call.pos
                )
            backbone = self.v.model.backbone
            assert backbone is not None  # checked before forwards
            if "rope" in builtin.needs and not any(
                s.kind == "primitive" and s.target == "Rotary" for s in backbone.submodules
            ):
                raise self.v.error("`rotary` needs a `Rotary(...)` submodule in the backbone", call.pos)
            return builtin.returns
        field = self.v.fields.get(call.func)
        if call.func in ACTIVATIONS or (field is not None and field.type.name == "activation"):
            if len(call.args) != 1 or call.kwargs:
                raise self.v.error(f"activation `{call.func}` takes one tensor", call.pos)
            self.tensor(call.args[0])
            return 1
        candidates = [*self.subs, *BUILTINS, *ACTIVATIONS]
        raise self.v.error(
            f"unknown function or submodule `{call.func}`{did_you_mean(call.func, candidates)}", call.pos
        )


def walk(expr: ir.Expr) -> Iterator[ir.Expr]:
    """Every node of an expression, itself first."""
    yield expr
    children: tuple = ()
    if isinstance(expr, ir.Unary):
        children = (expr.operand,)
    elif isinstance(expr, ir.BinOp):
        children = (expr.left, expr.right)
    elif isinstance(expr, ir.IfExp):
        children = (expr.test, expr.body, expr.orelse)
    elif isinstance(expr, ir.ListExpr):
        children = expr.items
    elif isinstance(expr, ir.Call):
        children = (*expr.args, *(v for _, v in expr.kwargs))
    for child in children:
        yield from walk(child)


def validate(model: ir.Model) -> dict[str, object]:
    """Check a flat model; return the default config values it implies."""
    defaults = Validator(model).run()
    if not all(math.isfinite(v) for v in defaults.values() if isinstance(v, float)):
        raise SpecError("a config default is not finite", model.pos)
    return defaults
