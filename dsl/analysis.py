"""Facts about a flat model, computed once: what the validator checks against and the generator reads.

The analysis walks the model once, in dependency order (config fields after the fields their defaults
read, blocks after the blocks they hold), and records what later stages would otherwise each work out
again: the defaults of the config, which `let` values differ per layer, how many tensors each forward
returns, which blocks read the model's inputs, what implicit context (rotary tables, attention mask, KV
cache) each block's dataflow needs, and which blocks are built with their layer index. It raises a
`SpecError` only where a fact cannot be computed (an unknown name a default reads, a cycle); every other
check is `validate`'s.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from . import ir
from .errors import SpecError, did_you_mean
from .interpret import evaluate
from .library import ACTIVATIONS, BUILTINS, PRIMITIVES, ROPE_LEGACY_KEYS

# Implicit context a block's forward can need, in the order it is passed.
CONTEXT = ("rope", "mask", "cache")


@dataclass(frozen=True)
class Facts:
    field_order: tuple[str, ...]  # config fields, each after the fields its default reads
    defaults: Mapping[str, object]  # the default config's values
    layer_lets: frozenset[str]  # `let` fields that read `layer_idx`: one value per layer
    layer_scoped: frozenset[str]  # blocks built once per layer (under a `repeat`)
    children_first: tuple[str, ...]  # every block after the blocks it holds, the backbone before heads
    input_blocks: frozenset[str]  # blocks that read the model's inputs: the backbone and its holders
    returns: Mapping[str, int]  # block -> how many tensors its forward returns
    needs: Mapping[str, frozenset[str]]  # block -> the implicit context (CONTEXT) its dataflow needs
    layer_idx_blocks: frozenset[str]  # blocks whose constructor takes `layer_idx`
    layer_idx_kept: frozenset[str]  # blocks whose forward reads `self.layer_idx` (cache, per-layer values)
    per_layer_values: Mapping[str, tuple[str, ...]]  # block -> the per-layer `let`s its forward reads
    reachable: frozenset[str]  # blocks some backbone or head holds, directly or not

    def takes_inputs(self, block: str) -> bool:
        return block in self.input_blocks


def dependency_order(
    names: Iterable[str], deps: Callable[[str], Iterable[str]], on_cycle: Callable[[list[str]], SpecError]
) -> list[str]:
    """`names` ordered so that each comes after its dependencies (depth first, in the given order)."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            raise on_cycle([*trail[trail.index(name) :], name])
        state[name] = "active"
        for dep in deps(name):
            visit(dep, [*trail, name])
        state[name] = "done"
        order.append(name)

    for name in names:
        visit(name, [])
    return order


def is_bare_literal(field: ir.ConfigField) -> bool:
    """Activation and enum defaults are written as bare names (`hidden_act: activation = silu`)."""
    return isinstance(field.default, ir.Name) and field.type.name in ("activation", "enum")


def may_be_causal(call: ir.Call) -> bool:
    """An `attend` whose `causal` is not literally false: it attends to earlier positions, so it caches."""
    causal = call.kwarg("causal")
    return causal is not None and not (isinstance(causal, ir.Const) and causal.value is False)


_NO_FORWARD = ir.Forward(params=(), body=(), pos=ir.Pos(file="", line=0, column=0))


class _Analysis:
    def __init__(self, model: ir.Model | ir.ResolvedModel) -> None:
        self.model = model
        self.fields = {f.name: f for f in model.config.fields}
        self.blocks = {b.name: b for b in model.blocks}
        # A block without a forward is the validator's error to report; here it simply computes nothing.
        self.forwards = {b.name: b.forward or _NO_FORWARD for b in model.blocks}

    # ---- config ----------------------------------------------------------------------------------
    def field_deps(self, name: str) -> list[str]:
        field = self.fields[name]
        if field.default is None or is_bare_literal(field):
            return []
        deps = []
        for ref in ir.names_in(field.default):
            if ref.id == "layer_idx":
                if not field.computed:
                    raise SpecError("only `let` fields may depend on `layer_idx`", ref.pos)
                continue
            if ref.id not in self.fields:
                raise SpecError(f"unknown field `{ref.id}`{did_you_mean(ref.id, self.fields)}", ref.pos)
            if self.fields[ref.id].default is None:
                raise SpecError(f"`{ref.id}` has no default, so `{name}` cannot default to it", ref.pos)
            deps.append(ref.id)
        return deps

    def config(self) -> tuple[list[str], set[str], dict[str, object]]:
        def cycle(trail: list[str]) -> SpecError:
            return SpecError(
                f"config defaults depend on each other: {' -> '.join(trail)}", self.fields[trail[0]].pos
            )

        order = dependency_order(self.fields, self.field_deps, cycle)
        layer_lets: set[str] = set()
        for name in order:  # dependencies first, so a field reading a per-layer `let` is seen after it
            field = self.fields[name]
            if field.default is None or is_bare_literal(field):
                continue
            for ref in ir.names_in(field.default):
                if ref.id == "layer_idx" or ref.id in layer_lets:
                    if not field.computed:
                        raise SpecError(
                            f"`{ref.id}` depends on the layer; only `let` fields may use it", ref.pos
                        )
                    layer_lets.add(name)
        defaults: dict[str, object] = {}
        for name in order:
            field = self.fields[name]
            if field.default is None:
                continue
            env = ChainMap({"layer_idx": 0}, defaults) if name in layer_lets else defaults
            defaults[name] = evaluate(config_literal(field), env)
        return order, layer_lets, defaults

    # ---- module tree -----------------------------------------------------------------------------
    def check_tree(self) -> None:
        """Every held block exists and no block holds itself: the facts below walk the tree."""
        backbones = [b for b in self.model.blocks if b.role == "backbone"]
        if len(backbones) != 1:
            raise SpecError(f"model `{self.model.name}` needs exactly one backbone", self.model.pos)
        for block in self.model.blocks:
            for sub in (c for s in block.submodules for c in s.choices()):
                if sub.kind != "primitive" and sub.target not in self.blocks:
                    hint = did_you_mean(sub.target, self.blocks)
                    raise SpecError(f"unknown block `{sub.target}`{hint}", sub.pos)

        def cycle(trail: list[str]) -> SpecError:
            return SpecError(f"blocks contain each other: {' -> '.join(trail)}", self.blocks[trail[0]].pos)

        dependency_order(self.blocks, self.held, cycle)

    def held(self, name: str) -> list[str]:
        return [c.target for s in self.blocks[name].submodules for c in s.choices() if c.kind != "primitive"]

    def layer_scoped(self) -> set[str]:
        scoped: set[str] = set()

        def mark(name: str) -> None:
            if name not in scoped:
                scoped.add(name)
                for sub in (c for s in self.blocks[name].submodules for c in s.choices()):
                    if sub.kind == "block":
                        mark(sub.target)

        for block in self.model.blocks:
            for sub in block.submodules:
                if sub.kind == "repeat":
                    mark(sub.target)
        return scoped

    def holds_backbone(self, name: str) -> bool:
        return any(
            self.blocks[c.target].role == "backbone" or self.holds_backbone(c.target)
            for s in self.blocks[name].submodules
            for c in s.choices()
            if c.kind == "block"
        )

    def children_first(self, backbone: str) -> list[str]:
        order: list[str] = []

        def visit(name: str) -> None:
            if name not in order:
                for target in self.held(name):
                    visit(target)
                order.append(name)

        for block in self.model.blocks:
            if block.role == "head" and not self.holds_backbone(block.name):
                visit(backbone)
            visit(block.name)
        return order

    def reachable(self) -> set[str]:
        seen: set[str] = set()
        stack = [b.name for b in self.model.blocks if b.role != "block"]
        while stack:
            for target in self.held(stack.pop()):
                if target not in seen:
                    seen.add(target)
                    stack.append(target)
        return seen

    # ---- dataflow --------------------------------------------------------------------------------
    def count(self, expr: ir.Expr, subs: dict[str, ir.Submodule], returns: dict[str, int]) -> int:
        """How many tensors an expression yields (the validator checks that the count is consistent)."""
        if isinstance(expr, ir.IfExp):
            if isinstance(expr.body, ir.Const) and expr.body.value is None:
                return 1
            return self.count(expr.body, subs, returns)
        if not isinstance(expr, ir.Call):
            return 1
        sub = subs.get(expr.func)
        if sub is not None:
            if sub.kind == "primitive":
                return PRIMITIVES[sub.target].returns if sub.target in PRIMITIVES else 1
            return returns.get(sub.target, 1)
        builtin = BUILTINS.get(expr.func)
        if builtin is not None and builtin.count is not None:
            index = builtin.signature.names.index(builtin.count)
            literal = expr.args[index] if len(expr.args) > index else expr.kwarg(builtin.count)
            return literal_count(literal) or 1
        return builtin.returns if builtin is not None else 1

    def returns(self, order: list[str]) -> dict[str, int]:
        returns: dict[str, int] = {}
        for name in order:
            block = self.blocks[name]
            subs = {s.name: s for s in block.submodules}
            body = self.forwards[name].body
            last = body[-1] if body else None
            if isinstance(last, ir.Return):
                returns[name] = sum(self.count(v, subs, returns) for v in last.values)
        return returns

    def needs(self, order: list[str], inputs: set[str]) -> dict[str, frozenset[str]]:
        needs: dict[str, frozenset[str]] = {}
        for name in order:
            block = self.blocks[name]
            subs = {s.name: s for s in block.submodules}
            found: set[str] = set()
            for call in self.forwards[name].calls():
                sub = subs.get(call.func)
                if sub is None and call.func in BUILTINS:
                    found |= BUILTINS[call.func].needs & set(CONTEXT)
                    if call.func == "attend" and may_be_causal(call):
                        found.add("cache")
                elif (sub is not None and sub.kind == "repeat") or (
                    sub is not None and sub.kind == "block" and sub.target not in inputs
                ):
                    found |= needs.get(sub.target, frozenset())
            needs[name] = frozenset(found)
        return needs

    def reads_layer(self, expr: ir.Expr, layer_lets: set[str]) -> bool:
        return any(n.id == "layer_idx" or n.id in layer_lets for n in ir.names_in(expr))

    def layer_idx(self, order: list[str], layer_lets: set[str]) -> tuple[set[str], set[str]]:
        """(blocks built with `layer_idx`, blocks that keep it for their forward)."""
        kept: set[str] = set()
        built: set[str] = set()
        for name in order:
            block = self.blocks[name]
            forward = self.forwards[name]
            subs = {s.name for s in block.submodules}
            own_cache = any(
                c.func == "attend" and c.func not in subs and may_be_causal(c) for c in forward.calls()
            )
            if own_cache or any(n.id == "layer_idx" for n in forward.free_names()):
                kept.add(name)
            choices = [c for s in block.submodules for c in s.choices()]
            in_init = [e for s in choices for e in (*s.args, *(v for _, v in s.kwargs))]
            in_init += [s.condition for s in block.submodules if s.condition is not None]
            if (
                name in kept
                or any(self.reads_layer(e, layer_lets) for e in in_init)
                or any(n.id in layer_lets for n in forward.free_names())  # a per-layer value, set when built
                or any(s.kind == "block" and s.target in built for s in choices)
            ):
                built.add(name)
        return built, kept


def config_literal(field: ir.ConfigField) -> ir.Expr:
    """A field's default as an expression the interpreter evaluates; bare activation and enum names
    become strings. Checks what evaluating would otherwise misread."""
    default = field.default
    assert default is not None
    if is_bare_literal(field):
        assert isinstance(default, ir.Name)
        choices = ACTIVATIONS if field.type.name == "activation" else field.type.choices
        if default.id not in choices:
            hint = did_you_mean(default.id, choices)
            raise SpecError(f"`{default.id}` is not a known {field.type.name}{hint}", default.pos)
        return ir.String(value=default.id, pos=default.pos)
    for node in ir.walk(default):
        if isinstance(node, ir.Call) and node.func != "rope":
            raise SpecError(f"`{node.func}(...)` cannot be a config default", node.pos)
    if isinstance(default, ir.Call):
        if field.type.name != "rope":
            raise SpecError("`rope(...)` is the default of a `rope` field only", default.pos)
        _check_rope(default, nested_allowed=True)
    elif any(isinstance(node, ir.Call) for node in ir.walk(default)):
        call = next(node for node in ir.walk(default) if isinstance(node, ir.Call))
        raise SpecError("`rope(...)` is a field's whole default, not part of one", call.pos)
    return default


def _check_rope(call: ir.Call, nested_allowed: bool) -> None:
    """`rope(theta = ..., partial = ...)`, or tables per layer kind: `rope(full_attention = rope(...),
    sliding_attention = rope(...))` (the kinds a `rotary(q, k, kind = ...)` call picks from)."""
    if call.args:
        raise SpecError("rope(...) takes keyword arguments only", call.pos)
    nested = [isinstance(value, ir.Call) for _, value in call.kwargs]
    if any(nested) and not (all(nested) and nested_allowed):
        raise SpecError(
            "rope(...) takes either `theta`/`partial`, or one `kind = rope(...)` per layer kind", call.pos
        )
    for key, value in call.kwargs:
        if isinstance(value, ir.Call):
            _check_rope(value, nested_allowed=False)
        elif key in ROPE_LEGACY_KEYS:  # older configs' spelling of a parameter, at their top level
            if not isinstance(value, ir.String) or not value.value.isidentifier():
                raise SpecError(f'`{key}` names a config key: a string such as "rotary_pct"', value.pos)
        elif key not in ("theta", "partial"):  # the base, the fraction of each head that rotates
            hint = did_you_mean(key, ["theta", "partial", *ROPE_LEGACY_KEYS])
            raise SpecError(f"unknown rope parameter `{key}`{hint}; expected `theta` or `partial`", value.pos)


def analyze_config(model: ir.Model | ir.ResolvedModel) -> tuple[list[str], set[str], dict[str, object]]:
    """(field order, per-layer `let`s, default values): the config facts, which the module tree's
    checks need before the rest of the analysis can run."""
    return _Analysis(model).config()


def analyze(model: ir.Model | ir.ResolvedModel) -> Facts:
    """The facts about a flat model (its `extends` chain merged)."""
    analysis = _Analysis(model)
    order, layer_lets, defaults = analysis.config()
    analysis.check_tree()
    backbone = next(b.name for b in model.blocks if b.role == "backbone")
    blocks = analysis.children_first(backbone)
    inputs = {n for n, b in analysis.blocks.items() if b.role == "backbone" or analysis.holds_backbone(n)}
    built, kept = analysis.layer_idx(blocks, layer_lets)
    per_layer: dict[str, tuple[str, ...]] = {}
    for name in blocks:
        read = [n.id for n in analysis.forwards[name].free_names() if n.id in layer_lets]
        per_layer[name] = tuple(dict.fromkeys(read))
    return Facts(
        field_order=tuple(order),
        defaults=MappingProxyType(defaults),
        layer_lets=frozenset(layer_lets),
        layer_scoped=frozenset(analysis.layer_scoped()),
        children_first=tuple(blocks),
        input_blocks=frozenset(inputs),
        returns=MappingProxyType(analysis.returns(blocks)),
        needs=MappingProxyType(analysis.needs(blocks, inputs)),
        layer_idx_blocks=frozenset(built),
        layer_idx_kept=frozenset(kept),
        per_layer_values=MappingProxyType(per_layer),
        reachable=frozenset(analysis.reachable()),
    )


def literal_count(expr: object) -> int | None:
    """How many outputs a count argument asks for: a literal int, or the length of a literal list."""
    if isinstance(expr, ir.Number) and isinstance(expr.value, int) and not isinstance(expr.value, bool):
        return expr.value
    if isinstance(expr, ir.ListExpr):
        return len(expr.items)
    return None
