"""Semantic checks on a flat model: names resolve, types agree, the module tree is finite, forwards are
well formed. Every failure is a `SpecError` at the offending node."""

from __future__ import annotations

import keyword
import math
import re
from collections import ChainMap
from collections.abc import Mapping

from . import ir
from .analysis import Facts, analyze, literal_count
from .errors import SpecError, did_you_mean
from .interpret import MAX_REPEAT, evaluate, is_count, type_ok
from .library import (
    ACTIVATIONS,
    BACKBONE_INPUTS,
    BASE_CONFIG_DEFAULTS,
    BASE_CONFIG_FIELDS,
    BUILTINS,
    CONFIG_ATTRIBUTES,
    FORWARD_NAMES,
    PRIMITIVES,
    REQUIRED,
    TASKS,
    TYPES,
    Signature,
    runtime_names,
)

# Names a spec's forwards and classes may not take: the generated code's own.
_SHADOWED = FORWARD_NAMES | runtime_names().keys()

# How `parallel` may split a Linear: by output rows, by input columns, by rows with the output gathered
# on every rank (an lm_head), or not at all.
TP_STYLES = ("colwise", "rowwise", "gather", "replicate", "experts")


class Validator:
    """Checks a flat model against its facts (`dsl.analysis`); computes nothing the generator reads."""

    def __init__(self, model: ir.Model | ir.ResolvedModel, facts: Facts) -> None:
        self.model = model
        self.facts = facts
        self.fields = {f.name: f for f in model.config.fields}
        self.aliases = {a.alias: a for a in model.config.aliases}
        self.blocks = {b.name: b for b in model.blocks}
        self.defaults = facts.defaults
        self.layer_lets = facts.layer_lets  # `let` fields that read `layer_idx`: only usable per layer
        backbone = model.backbone
        self.options = {o.name: o for o in backbone.options} if backbone is not None else {}
        literal = (ir.Number, ir.Const)
        options = {o.name: o.default.value for o in self.options.values() if isinstance(o.default, literal)}
        aliases = {a.alias: self.defaults.get(a.target) for a in self.aliases.values()}
        # what size arguments are evaluated against: the default config, options and aliases included
        self._size_env = ChainMap(aliases, {"layer_idx": 0, **BASE_CONFIG_DEFAULTS}, options, self.defaults)

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
            if field.name in CONFIG_ATTRIBUTES:
                raise self.error(
                    f"`{field.name}` is an attribute every config has; choose another field name", field.pos
                )
            if field.name in BASE_CONFIG_FIELDS:
                raise self.error(
                    f"`{field.name}` is provided by every config and cannot be redeclared", field.pos
                )
        for alias in self.model.config.aliases:
            if alias.target not in self.fields or self.fields[alias.target].computed:
                hint = did_you_mean(alias.target, self.fields)
                raise self.error(
                    f"alias `{alias.alias}` points to unknown field `{alias.target}`{hint}", alias.pos
                )
            if alias.alias in self.fields:
                raise self.error(f"alias `{alias.alias}` collides with a field of that name", alias.pos)
        for name in self.facts.field_order:
            field = self.fields[name]
            if field.default is not None and not type_ok(self.defaults[name], field.type):
                raise self.error(
                    f"default of `{field.name}` is {self.defaults[name]!r}, which is not of type `{field.type}`",
                    field.default.pos,
                )

    def check_config_expr(self, expr: ir.Expr, layer_scope: bool, what: str, options: bool = False) -> None:
        """An expression over config values (and, in the backbone, its options), as used in constructor
        arguments, conditions and forwards."""
        for node in ir.walk(expr):
            if isinstance(node, ir.Call):
                raise self.error(f"calls are not allowed in {what}", node.pos)
        for ref in ir.names_in(expr):
            if ref.id == "layer_idx" or ref.id in self.layer_lets:
                if layer_scope:
                    continue
                raise self.error(
                    f"`{ref.id}` depends on the layer and is only known inside a repeated block", ref.pos
                )
            if ref.id in self.fields or ref.id in BASE_CONFIG_FIELDS or ref.id in self.aliases:
                continue
            if options and ref.id in self.options:
                continue
            hint = did_you_mean(
                ref.id, [*self.fields, *BASE_CONFIG_FIELDS, *(self.options if options else ())]
            )
            raise self.error(f"unknown field `{ref.id}` in {what}{hint}", ref.pos)

    # ---- module tree -----------------------------------------------------------------------------
    def check_blocks(self) -> None:
        backbone = self.model.backbone
        assert backbone is not None  # the analysis found exactly one
        self._check_options(backbone)
        for block in self.model.blocks:
            _check_class_name(self.model.name, block)
            if block.role == "head" and block.backbone_args:
                self._check_backbone_args(block.backbone_args, block.pos)
            for sub in block.submodules:
                self._check_submodule(block, sub, block.name in self.facts.layer_scoped)
                if sub.otherwise is not None:
                    _check_choice(self, block, sub)
            for tie in block.ties:
                self._check_tie(block, tie)
            _check_parallel(self, block)
            if block.role == "head" and block.task not in TASKS:
                hint = did_you_mean(block.task or "", TASKS)
                raise self.error(f"unknown task `{block.task}` for head `{block.name}`{hint}", block.pos)

    def _check_options(self, backbone: ir.Block) -> None:
        for option in backbone.options:
            if option.name in self.fields or option.name in BASE_CONFIG_FIELDS:
                raise self.error(f"option `{option.name}` has the name of a config field", option.pos)
            if option.type.name not in ("bool", "int", "float", "str"):
                raise self.error("backbone options are bool, int, float or str", option.pos)
            assert option.default is not None
            value = evaluate(option.default, {})
            if not type_ok(value, option.type):
                raise self.error(
                    f"default of `{option.name}` is {value!r}, not of type `{option.type}`", option.pos
                )

    def _check_backbone_args(self, args: tuple[tuple[str, ir.Expr], ...], pos: ir.Pos) -> None:
        for key, value in args:
            if key not in self.options:
                hint = did_you_mean(key, self.options)
                known = ", ".join(self.options) or "none"
                raise self.error(f"the backbone has no option `{key}`{hint} (options: {known})", value.pos)
            self.check_config_expr(value, False, f"option `{key}`")

    def _check_submodule(self, block: ir.Block, sub: ir.Submodule, layer_scope: bool) -> None:
        in_backbone = block.role == "backbone"
        if sub.condition is not None:
            self.check_config_expr(
                sub.condition, layer_scope, f"the condition of `{sub.name}`", options=in_backbone
            )
        if sub.kind == "block" and (sub.args or sub.kwargs):
            if self.blocks[sub.target].role != "backbone":
                raise self.error(
                    f"only the backbone takes options; write `{sub.name} = {sub.target}`", sub.pos
                )
            if sub.args:
                raise self.error("backbone options are given by name", sub.pos)
            self._check_backbone_args(sub.kwargs, sub.pos)
            return
        if sub.kind == "primitive":
            primitive = PRIMITIVES.get(sub.target)
            if primitive is None:
                hint = did_you_mean(sub.target, [*PRIMITIVES, *self.blocks])
                raise self.error(f"unknown primitive `{sub.target}`{hint}", sub.pos)
            bound = bind(primitive.signature, sub.args, sub.kwargs, sub.pos)
            for arg in (*sub.args, *(v for _, v in sub.kwargs)):
                self.check_config_expr(
                    arg, layer_scope, f"the arguments of `{sub.name}`", options=in_backbone
                )
            for size in primitive.sizes:
                _check_size(sub, size, bound[size], self._size_env)
            if sub.target == "Rotary" and block.role != "backbone":
                raise self.error("Rotary belongs in the backbone, which computes positions once", sub.pos)
            return
        target = self.blocks[sub.target]
        if target.role == "head":
            raise self.error(f"`{sub.target}` is a head and cannot be used as a submodule", sub.pos)
        if target.role == "backbone" and (sub.kind == "repeat" or sub.condition is not None):
            raise self.error("the backbone is held once, unconditionally", sub.pos)
        if sub.kind == "repeat":
            assert sub.count is not None
            self.check_config_expr(sub.count, False, "a repeat count")
            count = evaluate(sub.count, self.defaults)
            if not is_count(count):
                raise self.error(
                    f"repeat count is {count!r} for the default config; expected an int in 0..{MAX_REPEAT}",
                    sub.count.pos,
                )

    def _check_tie(self, block: ir.Block, tie: ir.Tie) -> None:
        own = block.submodule(tie.name)
        if own is None or own.kind != "primitive":
            raise self.error(f"`tie {tie.name}`: `{block.name}` has no such primitive submodule", tie.pos)
        current = block
        path = list(tie.target)
        backbone = self.model.backbone
        assert backbone is not None
        if block.role == "head" and not self.facts.takes_inputs(block.name):
            if path[0] != (block.attr or backbone.attr):
                raise self.error(
                    f"tie targets start at the backbone: `{block.attr or backbone.attr}.…`", tie.pos
                )
            current, path = backbone, path[1:]
        for i, part in enumerate(path):
            sub = current.submodule(part)
            shown = ".".join(tie.target[: len(tie.target) - len(path) + i + 1])
            if sub is None:
                hint = did_you_mean(part, [s.name for s in current.submodules])
                raise self.error(f"`{shown}` does not exist{hint}", tie.pos)
            if sub.kind == "primitive":
                if i != len(path) - 1:
                    raise self.error(f"`{shown}` is a primitive with no submodules", tie.pos)
                if sub.target != own.target and {sub.target, own.target} != {"Linear", "Embedding"}:
                    raise self.error(f"cannot tie a {own.target} to a {sub.target}", tie.pos)
                break
            if sub.kind == "repeat":
                raise self.error("cannot tie into a repeated stack", tie.pos)
            current = self.blocks[sub.target]
        else:
            raise self.error(f"`{'.'.join(tie.target)}` is not a primitive submodule", tie.pos)
        if tie.condition is not None:
            self.check_config_expr(tie.condition, False, "a tie condition")

    # ---- dataflow --------------------------------------------------------------------------------
    def check_forwards(self) -> None:
        for block in self.model.blocks:
            if block.forward is None:
                raise self.error(f"{block.role} `{block.name}` has no forward", block.pos)
        for name in self.facts.children_first:
            block = self.blocks[name]
            assert block.forward is not None
            returns = self._check_forward(block, block.forward)
            assert returns == self.facts.returns[name], (name, returns)

    def _check_forward(self, block: ir.Block, forward: ir.Forward) -> int:
        for param in forward.params:
            if param in _SHADOWED:
                raise self.error(
                    f"`{param}` is a name the generated forward uses itself; rename this input", forward.pos
                )
        if not forward.params:
            raise self.error("a forward takes at least one input", forward.pos)
        if len(set(forward.params)) != len(forward.params):
            raise self.error("a forward input is named twice", forward.pos)
        if self.facts.takes_inputs(block.name):
            for param in forward.params:
                if param not in BACKBONE_INPUTS:
                    hint = did_you_mean(param, BACKBONE_INPUTS)
                    raise self.error(
                        f"`{block.name}` reads the model inputs ({', '.join(BACKBONE_INPUTS)}); got `{param}`{hint}",
                        forward.pos,
                    )
            if "input_ids" not in forward.params:
                raise self.error(f"the forward of `{block.name}` takes `input_ids`", forward.pos)
        elif block.role == "head":
            backbone = self.model.backbone
            assert backbone is not None
            outputs = self.facts.returns.get(backbone.name, 1)
            task = TASKS.get(block.task or "")
            names = ["last_hidden_state", "pooler_output"][:outputs]
            if task is not None and task.second != "out.pooler_output":  # the task's own second input
                outputs, names = 2, ["last_hidden_state", task.second]
            if not 1 <= len(forward.params) <= outputs:
                raise self.error(
                    f"a head's forward takes the backbone's outputs ({', '.join(names)})", forward.pos
                )
        scope = _ForwardScope(self, block, set(forward.params))
        returns = 0
        for i, stmt in enumerate(forward.body):
            if isinstance(stmt, ir.Return):
                if i != len(forward.body) - 1:
                    raise self.error("statements after `return` never run", forward.body[i + 1].pos)
                counts = [scope.tensor(value) for value in stmt.values]
                if len(counts) > 1 and counts != [1] * len(counts):
                    raise self.error("each returned value must be a single tensor", stmt.pos)
                returns = sum(counts)
            else:
                scope.assign(stmt)
        if not forward.body or not isinstance(forward.body[-1], ir.Return):
            raise self.error(f"the forward of `{block.name}` must end with `return`", forward.pos)
        if block.role == "backbone" and returns > 2:
            raise self.error(
                "a backbone returns its hidden states and, optionally, a pooled output", forward.pos
            )
        if block.role == "head":
            expected = TASKS[block.task or ""].outputs
            if returns != len(expected):
                raise self.error(
                    f"a {block.task} head returns {len(expected)} value(s) ({', '.join(expected)}), not {returns}",
                    forward.body[-1].pos,
                )
        return returns

    def check_model_type(self) -> None:
        model_type = self.model.type_name
        if not re.fullmatch(r"[a-z][a-z0-9_]*", model_type) or keyword.iskeyword(model_type):
            raise self.error(
                f"model_type `{model_type}` must be lower-case letters, digits and underscores, and not a "
                "Python keyword (it names the generated package)",
                self.model.pos,
            )

    def run(self) -> None:
        self.check_model_type()
        self.check_config()
        self.check_blocks()
        self.check_forwards()
        _check_gguf(self)
        _check_stored_names(self)


def _check_parallel(v: Validator, block: ir.Block) -> None:
    seen: set[str] = set()
    for entry in block.parallel:
        if entry.style not in TP_STYLES:
            hint = did_you_mean(entry.style, TP_STYLES)
            raise v.error(
                f"unknown parallel style `{entry.style}`{hint}; expected one of {', '.join(TP_STYLES)}",
                entry.pos,
            )
        for name in entry.names:
            sub = block.submodule(name)
            if sub is None:
                hint = did_you_mean(name, [s.name for s in block.submodules])
                raise v.error(
                    f"`parallel` names `{name}`, which is not a submodule of `{block.name}`{hint}",
                    entry.pos,
                )
            splits = "Experts" if entry.style == "experts" else "Linear"
            if sub.kind != "primitive" or sub.target != splits:
                raise v.error(
                    f"`parallel ...: {entry.style}` splits {splits} submodules; `{name}` is a {sub.target}",
                    entry.pos,
                )
            if name in seen:
                raise v.error(f"`{name}` is given two parallel styles in `{block.name}`", entry.pos)
            seen.add(name)


def _check_choice(v: Validator, block: ir.Block, sub: ir.Submodule) -> None:
    """`name = A if cond else B`: two modules of the same kind, called the same way."""
    other = sub.otherwise
    assert other is not None
    v._check_submodule(block, other, block.name in v.facts.layer_scoped)
    roles = [v.blocks[s.target].role if s.kind == "block" else s.kind for s in (sub, other)]
    if "repeat" in roles or "backbone" in roles:
        raise v.error("`if ... else` chooses between two blocks or primitives", sub.pos)
    if _signature(v, sub) != _signature(v, other):
        raise v.error(
            f"`{sub.target}` and `{other.target}` are called differently ({_signature(v, sub)} vs "
            f"{_signature(v, other)} tensors in, out): `if ... else` needs the same",
            other.pos,
        )


def _signature(v: Validator, sub: ir.Submodule) -> tuple[int, int]:
    """(tensors in, tensors out) of a submodule's forward."""
    if sub.kind == "primitive":
        return PRIMITIVES[sub.target].inputs, PRIMITIVES[sub.target].returns
    forward = v.blocks[sub.target].forward
    assert forward is not None
    return len(forward.params), v.facts.returns[sub.target]


def _check_stored_names(v: Validator) -> None:
    """`stored Block.sub as "name"`: a submodule of a block, stored under a name it does not have."""
    for entry in v.model.stored_names:
        block = v.blocks.get(entry.block)
        if block is None:
            raise v.error(f"unknown block `{entry.block}`{did_you_mean(entry.block, v.blocks)}", entry.pos)
        if block.submodule(entry.name) is None:
            hint = did_you_mean(entry.name, [s.name for s in block.submodules])
            raise v.error(f"`{entry.block}` has no submodule `{entry.name}`{hint}", entry.pos)
        if block.submodule(entry.stored) is not None:
            raise v.error(f"`{entry.block}` already has a submodule `{entry.stored}`", entry.pos)


def _check_gguf(v: Validator) -> None:
    """`gguf "arch" { Block.sub: rows(...) -> (...) }`: a llama.cpp name, Linear targets, a permutation."""
    layout = v.model.gguf
    if layout is None:
        return
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", layout.architecture):
        raise v.error(
            f'gguf architecture "{layout.architecture}" is not a llama.cpp architecture name '
            '(lower-case letters, digits, `_`, `-` and `.`, as in "llama" or "gptneox")',
            layout.pos,
        )
    seen: set[tuple[str, str]] = set()
    for rows in layout.rows:
        for block_name, sub_name in rows.targets:
            block = v.blocks.get(block_name)
            if block is None:
                hint = did_you_mean(block_name, v.blocks)
                raise v.error(f"gguf rows name unknown block `{block_name}`{hint}", rows.pos)
            sub = block.submodule(sub_name)
            if sub is None:
                hint = did_you_mean(sub_name, [s.name for s in block.submodules])
                raise v.error(f"`{block_name}` has no submodule `{sub_name}`{hint}", rows.pos)
            if sub.kind != "primitive" or sub.target != "Linear":
                raise v.error(
                    f"gguf rows reorder the output rows of a Linear; `{block_name}.{sub_name}` is a "
                    f"{sub.target}",
                    rows.pos,
                )
            if (block_name, sub_name) in seen:
                raise v.error(f"`{block_name}.{sub_name}` is given two gguf row orders", rows.pos)
            seen.add((block_name, sub_name))
        for expr in rows.shape:
            v.check_config_expr(expr, layer_scope=False, what="a gguf row shape")
        if len(rows.shape) < 2 or sorted(rows.order) != list(range(len(rows.shape))):
            raise v.error(
                f"gguf rows: the order {rows.order} must name each of the {len(rows.shape)} axes of the "
                "shape once (and a shape has at least two)",
                rows.pos,
            )


def _check_class_name(model: str, block: ir.Block) -> None:
    """Blocks become classes `<Model><Block>`: none may be the config class, the model's base class or
    a name the generated module imports."""
    class_name = f"{model}{block.name}"
    if block.name in ("Config", "PreTrainedModel") or class_name in _SHADOWED:
        raise SpecError(
            f"block `{block.name}` would generate a class `{class_name}` that already exists", block.pos
        )


def _check_size(sub: ir.Submodule, name: str, expr: object, env: Mapping[str, object]) -> None:
    """A size the default config makes zero, negative or not an int would fail only when the model is
    built."""
    if not isinstance(expr, ir.Node):
        return
    try:
        if sub.condition is not None and not evaluate(sub.condition, env):
            return  # not built for the default config
        value = evaluate(expr, env)  # type: ignore[arg-type]
    except (SpecError, KeyError):
        return  # not computable from the defaults alone: nothing to say here
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpecError(
            f"`{name}` of `{sub.name}` is {value!r} for the default config; a size must be a positive int",
            expr.pos,  # type: ignore[attr-defined]
        )


def bind(signature: Signature, args: tuple, kwargs: tuple, pos: ir.Pos) -> dict[str, ir.Expr | object]:
    """Match call arguments to a signature, as Python would, with errors a spec author can act on."""
    if len(args) > len(signature.params):
        raise SpecError(
            f"`{signature.name}` takes at most {len(signature.params)} positional arguments "
            f"({', '.join(signature.names)}), got {len(args)}",
            pos,
        )
    bound: dict[str, ir.Expr | object] = dict(zip(signature.names, args, strict=False))
    for key, value in kwargs:
        if key not in signature.names:
            hint = did_you_mean(key, signature.names)
            raise SpecError(f"`{signature.name}` has no parameter `{key}`{hint}", value.pos)
        if key in bound:
            raise SpecError(f"`{signature.name}` got `{key}` twice", value.pos)
        bound[key] = value
    for param in signature.params:
        if param.name not in bound:
            if param.default is REQUIRED:
                raise SpecError(f"`{signature.name}` is missing its `{param.name}` argument", pos)
            bound[param.name] = param.default
    return bound


class _ForwardScope:
    """Tracks what each name in a forward is (a tensor local, a config scalar) and checks calls."""

    def __init__(self, validator: Validator, block: ir.Block, params: set[str]) -> None:
        self.v = validator
        self.block = block
        self.locals = set(params)
        self.subs = {s.name: s for s in block.submodules}
        self.guards: list[ir.Expr] = []  # conditions known to hold where we are (inside `a if cond else b`)
        self.layer_scope = block.name in validator.facts.layer_scoped

    def assign(self, stmt: ir.Assign) -> None:
        value = stmt.value
        if isinstance(value, ir.Call) and value.func in self.subs and self.subs[value.func].kind == "repeat":
            if len(stmt.targets) != 1 or len(value.args) != 1 or value.kwargs:
                raise self.v.error(f"a repeated stack is applied as `x = {value.func}(x)`", value.pos)
            if self.v.facts.returns.get(self.subs[value.func].target) != 1:
                raise self.v.error("a repeated block must return exactly one tensor", value.pos)
            self.tensor(value.args[0])
            self.locals.update(stmt.targets)
            return
        returns = self.tensor(value)
        sub = self.subs.get(value.func) if isinstance(value, ir.Call) else None
        if sub is not None and sub.kind == "block" and self.v.blocks[sub.target].role == "backbone":
            returns = min(returns, len(stmt.targets))  # the hidden states, and the pooled output if wanted
        if returns != len(stmt.targets):
            raise self.v.error(
                f"this produces {returns} value(s) but {len(stmt.targets)} are assigned", stmt.pos
            )
        for target in stmt.targets:
            if target in _SHADOWED:
                raise self.v.error(
                    f"`{target}` is a name the generated forward uses itself; choose another name", stmt.pos
                )
            if target in self.v.fields or target in self.subs:
                raise self.v.error(f"`{target}` is already a config field or submodule", stmt.pos)
        self.locals.update(stmt.targets)

    def scalar(self, expr: ir.Expr) -> None:
        for node in ir.walk(expr):
            if isinstance(node, ir.Call):
                raise self.v.error("calls are not allowed in a config expression", node.pos)
            if isinstance(node, ir.Name) and node.id in self.locals:
                raise self.v.error(f"`{node.id}` is a tensor; a config value is expected here", node.pos)
        self.v.check_config_expr(
            expr, self.layer_scope, "this expression", options=self.block.role == "backbone"
        )

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
            self.guards.append(expr.test)
            try:
                left = self._branch(expr.body)
            finally:
                self.guards.pop()
            right = self._branch(expr.orelse)
            if left != right:
                raise self.v.error("both branches must produce the same number of values", expr.pos)
            return left
        if isinstance(expr, ir.Call):
            return self.call(expr)
        raise self.v.error("expected a tensor expression", expr.pos)

    def _branch(self, expr: ir.Expr) -> int:
        """A branch of `a if cond else b`: a tensor, or `none` for an output that is absent."""
        if isinstance(expr, ir.Const) and expr.value is None:
            return 1
        return self.tensor(expr)

    def _operand(self, expr: ir.Expr) -> int:
        """1 for a tensor operand, 0 for a config scalar."""
        if any(isinstance(n, ir.Name) and n.id in self.locals for n in ir.walk(expr)) or any(
            isinstance(n, ir.Call) for n in ir.walk(expr)
        ):
            return self.tensor(expr)
        self.scalar(expr)
        return 0

    def call(self, call: ir.Call) -> int:
        sub = self.subs.get(call.func)
        if sub is not None:
            return self._call_submodule(sub, call)
        builtin = BUILTINS.get(call.func)
        if builtin is not None:
            bound = bind(builtin.signature, call.args, call.kwargs, call.pos)
            for i, name in enumerate(builtin.signature.names):
                value = bound[name]
                if not isinstance(value, ir.Node):
                    continue
                if name in builtin.tensor_keywords and isinstance(value, ir.Const) and value.value is None:
                    continue
                if i < builtin.tensor_params or name in builtin.tensor_keywords:
                    if self.tensor(value) != 1:  # type: ignore[arg-type]
                        raise self.v.error("each input must be a single tensor", value.pos)  # type: ignore[union-attr]
                else:
                    self.scalar(value)  # type: ignore[arg-type]
            if builtin.needs & {"input_ids", "attention_mask"} and self.block.role != "head":
                raise self.v.error(
                    f"`{call.func}` pools a head's input and is only available in heads", call.pos
                )
            backbone = self.v.model.backbone
            assert backbone is not None  # checked before forwards
            if "rope" in builtin.needs and not any(
                s.kind == "primitive" and s.target == "Rotary" for s in backbone.submodules
            ):
                raise self.v.error("`rotary` needs a `Rotary(...)` submodule in the backbone", call.pos)
            if builtin.count is not None:  # as many outputs as its count argument says
                count = literal_count(bound[builtin.count])
                if count is None or not 1 <= count <= 8:
                    raise self.v.error(
                        f"`{call.func}` needs a literal `{builtin.count}` from 1 to 8 (an int, or a list of sizes)",
                        call.pos,
                    )
                return count
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

    def _call_submodule(self, sub: ir.Submodule, call: ir.Call) -> int:
        if sub.kind == "repeat":
            raise self.v.error(
                f"a repeated stack is applied in its own statement: `x = {sub.name}(x)`", call.pos
            )
        if sub.kind == "primitive" and sub.target == "Rotary":
            raise self.v.error("the rotary tables are applied with `rotary(q, k)` in attention", call.pos)
        if (
            sub.condition is not None
            and sub.otherwise is None
            and not any(ir.same_expr(sub.condition, g) for g in self.guards)
        ):
            raise self.v.error(
                f"`{sub.name}` exists only if its condition holds: call it as `{sub.name}(x) if <condition> else ...`",
                call.pos,
            )
        if call.kwargs:
            raise self.v.error("submodules take tensors as positional arguments only", call.pos)
        expected, returns = 1, 1
        if sub.kind == "primitive":
            expected, returns = PRIMITIVES[sub.target].inputs, PRIMITIVES[sub.target].returns
        if sub.kind == "block":
            callee = self.v.blocks[sub.target]
            assert callee.forward is not None
            expected, returns = len(callee.forward.params), self.v.facts.returns[sub.target]
            if self.v.facts.takes_inputs(callee.name):
                # Inputs are matched by name; attention_mask and the rest travel along implicitly.
                if len(call.args) > expected:
                    raise self.v.error(f"`{call.func}` takes {', '.join(callee.forward.params)}", call.pos)
                expected = len(call.args)
        if len(call.args) != expected:
            raise self.v.error(
                f"`{call.func}` takes {expected} tensor input(s), got {len(call.args)}", call.pos
            )
        for arg in call.args:
            if self.tensor(arg) != 1:
                raise self.v.error("each input must be a single tensor", arg.pos)
        return returns


def validate(model: ir.Model | ir.ResolvedModel, facts: Facts | None = None) -> Facts:
    """Check a flat model; return its facts (computed here unless given)."""
    facts = analyze(model) if facts is None else facts
    if not all(math.isfinite(v) for v in facts.defaults.values() if isinstance(v, float)):
        raise SpecError("a config default is not finite", model.pos)
    Validator(model, facts).run()
    return facts
