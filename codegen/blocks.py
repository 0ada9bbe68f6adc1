"""Blocks -> classes: what `__init__` builds and the statements of `forward`.

Nothing is emitted for a feature a spec does not use: a block takes the rotary tables, the mask or the
cache only when its dataflow (or a block it calls) needs them (`Facts.needs`).
"""

from __future__ import annotations

from specformer.dsl import ir
from specformer.dsl.analysis import CONTEXT, may_be_causal
from specformer.dsl.errors import SpecError
from specformer.dsl.ir import calls_in, names_in, statement_exprs
from specformer.dsl.library import PRIMITIVES

from .code import Class, Function, Line, Nested, Param, Stmt, comments
from .config_plan import is_literal
from .context import ModelContext
from .expressions import ExprEmitter

_CONTEXT_PARAMS = {
    "rope": Param("rope", "Rope"),
    "mask": Param("mask", "AttentionMask"),
    "cache": Param("cache", "Cache | None"),
}


class BlockPlanner:
    def __init__(self, ctx: ModelContext) -> None:
        self.ctx = ctx

    # ---- __init__ ----------------------------------------------------------------------------------
    def construct(self, sub: ir.Submodule, options: frozenset[str] = frozenset()) -> str:
        ctx = self.ctx
        expr = ctx.config_expr("config", options=options)
        if sub.kind == "block":
            target = ctx.blocks[sub.target]
            per_layer = (
                target.role == "block"
                and not ctx.facts.takes_inputs(target.name)
                and sub.target in ctx.facts.layer_idx_blocks
            )
            args = ["config", "layer_idx"] if per_layer else ["config"]
            args += [f"{key}={expr(value)}" for key, value in sub.kwargs]  # backbone options
            built = f"{ctx.class_name(sub.target)}({', '.join(args)})"
        elif sub.kind == "repeat":
            assert sub.count is not None
            cls = ctx.class_name(sub.target)
            if sub.target in ctx.facts.layer_idx_blocks:
                built = f"nn.ModuleList({cls}(config, layer_idx) for layer_idx in range({expr(sub.count)}))"
            else:
                built = f"nn.ModuleList({cls}(config) for _ in range({expr(sub.count)}))"
        else:
            primitive = PRIMITIVES[sub.target]
            signature, positional = primitive.signature, primitive.positional
            given = dict(zip(signature.names, sub.args, strict=False)) | dict(sub.kwargs)
            args = [expr(given[name]) for name in signature.names[:positional]]
            defaults = {p.name: repr(p.default) for p in signature.params}
            for name in signature.names[positional:]:
                if name in given and expr(given[name]) != defaults[name]:
                    args.append(f"{name}={expr(given[name])}")
            built = f"{primitive.constructor}({', '.join(args)})"
        if sub.condition is not None:
            otherwise = "None" if sub.otherwise is None else self.construct(sub.otherwise, options)
            return f"{built} if {expr(sub.condition)} else {otherwise}"
        return built

    def init_body(self, block: ir.Block) -> list[Stmt]:
        ctx = self.ctx
        assert block.forward is not None
        options = frozenset(o.name for o in block.options)
        lines: list[Stmt] = []
        read = {n.id for n in block.forward.free_names()}
        for option in block.options:
            if option.name in read:
                lines.append(Line(f"self.{option.name} = {option.name}"))
        plain = block.role == "block" and not ctx.facts.takes_inputs(block.name)  # models keep `self.config`
        if plain and self._forward_reads_config(block):
            lines.append(Line("self.config = config"))
        if block.role == "block" and block.name in ctx.facts.layer_idx_kept:
            lines.append(Line("self.layer_idx = layer_idx"))
        for let in ctx.facts.per_layer_values[block.name]:
            # computed once per layer, as Hugging Face does for e.g. a layer's sliding window
            default = ctx.fields[let].default
            assert default is not None
            lines.append(Line(f"self.{let} = {ctx.config_expr('config')(default)}"))
        for sub in block.submodules:
            lines += comments(ctx.comments.take(sub.pos))
            lines.append(Line(f"self.{sub.name} = {self.construct(sub, options)}"))
        for act in self._activation_fields(block):
            lines.append(Line(f"self.{act}_fn = activation(config.{act})"))
        return lines

    def _activation_fields(self, block: ir.Block) -> list[str]:
        """Config fields of type `activation` the forward calls: each becomes a module attribute."""
        assert block.forward is not None
        subs = {s.name for s in block.submodules}
        found: list[str] = []
        for call in block.forward.calls():
            field = self.ctx.fields.get(call.func)
            is_activation = field is not None and field.type.name == "activation"
            if call.func not in subs and is_activation and call.func not in found:
                found.append(call.func)
        return found

    def _forward_reads_config(self, block: ir.Block) -> bool:
        assert block.forward is not None
        hoisted = set(self.ctx.facts.per_layer_values[block.name])
        options = {o.name for o in block.options}
        for n in block.forward.free_names():
            if n.id == "layer_idx" or n.id in hoisted or n.id in options:
                continue
            field = self.ctx.fields.get(n.id)
            if field is not None and field.computed and is_literal(field):
                continue
            return True
        return False

    # ---- forward -----------------------------------------------------------------------------------
    def statements(
        self, block: ir.Block, emit: ExprEmitter, context_names: dict[str, str]
    ) -> tuple[list[Stmt], list[str]]:
        """The forward body, and the values its final `return` returns (spelled)."""
        ctx = self.ctx
        assert block.forward is not None
        subs = {s.name: s for s in block.submodules}
        lines: list[Stmt] = []
        body = block.forward.body
        result: list[str] = []
        for index, stmt in enumerate(body):
            lines += comments(ctx.comments.take(stmt.pos))
            for value in statement_exprs(stmt):
                lines += self._cache_update(value, context_names)
            if isinstance(stmt, ir.Return):
                only = stmt.values[0] if len(stmt.values) == 1 else None
                sub = subs.get(only.func) if isinstance(only, ir.Call) else None
                if sub is not None and ctx.holds_inputs(sub):
                    result = [self.input_call(only, sub, emit)]  # type: ignore[arg-type]
                else:
                    result = [emit(v) for v in stmt.values]
                continue
            if len(stmt.targets) > 1:  # unpacked values nobody reads become `_`
                later = {n.id for s in body[index + 1 :] for e in statement_exprs(s) for n in names_in(e)}
                stmt = stmt.model_copy(
                    update={"targets": tuple(t if t in later else "_" for t in stmt.targets)}
                )
            value = stmt.value
            sub = subs.get(value.func) if isinstance(value, ir.Call) else None
            if sub is not None and sub.kind == "repeat":
                target, source = stmt.targets[0], emit(value.args[0])  # type: ignore[union-attr]
                if source != target:
                    lines.append(Line(f"{target} = {source}"))
                ctx_args = [context_names[c] for c in CONTEXT if c in ctx.facts.needs[sub.target]]
                call = f"layer({', '.join([target, *ctx_args])})"
                lines.append(Nested(f"for layer in self.{sub.name}:", (Line(f"{target} = {call}"),)))
                continue
            if sub is not None and ctx.holds_inputs(sub):
                lines += self._input_assign(stmt, sub, emit)
                continue
            shape = "  # (B, H, T, D)" if isinstance(value, ir.Call) and value.func == "split_heads" else ""
            lines.append(Line(f"{', '.join(stmt.targets)} = {emit(value)}{shape}"))
        return lines, result

    def input_call(self, call: ir.Call, sub: ir.Submodule, emit: ExprEmitter) -> str:
        """`bert_model(input_ids, token_type_ids)`: the spec's inputs by name, the rest passed along."""
        callee = self.ctx.blocks[sub.target]
        assert callee.forward is not None
        given = {p: emit(a) for p, a in zip(callee.forward.params, call.args, strict=False)}
        names = [p.name for p in self.ctx.model_inputs()]
        args = [given.get("input_ids", "input_ids")]
        args += [f"{n}={given.get(n, n)}" for n in names[1:]]
        return f"self.{sub.name}({', '.join(args)})"

    def _input_assign(self, stmt: ir.Assign, sub: ir.Submodule, emit: ExprEmitter) -> list[Stmt]:
        assert isinstance(stmt.value, ir.Call)
        call = self.input_call(stmt.value, sub, emit)
        if self.ctx.blocks[sub.target].role != "backbone":
            return [Line(f"{', '.join(stmt.targets)} = {call}")]
        fields = ["last_hidden_state", "pooler_output"][: len(stmt.targets)]
        return [
            Line(f"out = {call}"),
            Line(f"{', '.join(stmt.targets)} = {', '.join(f'out.{f}' for f in fields)}"),
        ]

    def _cache_update(self, expr: ir.Expr, context_names: dict[str, str]) -> list[Stmt]:
        lines: list[Stmt] = []
        for call in calls_in(expr):
            if call.func != "attend" or not may_be_causal(call) or "cache" not in context_names:
                continue
            k, v = call.args[1], call.args[2]
            if not (isinstance(k, ir.Name) and isinstance(v, ir.Name)):
                raise SpecError(
                    "name the keys and values given to `attend` (`k = ...`) to cache them", call.pos
                )
            cache = context_names["cache"]
            update = Line(f"{k.id}, {v.id} = {cache}.update(self.layer_idx, {k.id}, {v.id})")
            lines.append(Nested(f"if {cache} is not None:", (update,)))
        return lines

    # ---- classes -----------------------------------------------------------------------------------
    def plain_block(self, block: ir.Block) -> Class:
        """A block of the module tree: tensors (and the context it needs) in, tensors out."""
        ctx = self.ctx
        assert block.forward is not None
        doc, forward_comments = ctx.docstring(block), ctx.forward_comments(block)
        needs = ctx.facts.needs[block.name]
        context_names = {c: c for c in needs}
        emit = ctx.forward_expr(block, context_names)
        params = [Param(p, "torch.Tensor") for p in block.forward.params]
        params += [_CONTEXT_PARAMS[c] for c in CONTEXT if c in needs]
        body, result = self.statements(block, emit, context_names)
        init_params = [Param("config", ctx.config_class)]
        if block.name in ctx.facts.layer_idx_blocks:
            init_params.append(Param("layer_idx", "int"))
        init = Function(
            "__init__", tuple(init_params), "None", (Line("super().__init__()"), *self.init_body(block))
        )
        forward = Function(
            "forward",
            tuple(params),
            ctx.returns(block),
            (*body, Line(f"return {', '.join(result)}")),
            forward_comments,
        )
        return Class(ctx.class_name(block.name), "nn.Module", doc, (), (init, forward))

    def input_block(self, block: ir.Block) -> Class:
        """A block holding the backbone (DPR's encoder): model inputs in, tensors out."""
        ctx = self.ctx
        doc, forward_comments = ctx.docstring(block), ctx.forward_comments(block)
        body, result = self.statements(block, ctx.forward_expr(block, {}), {})
        init_body = (Line("super().__init__(config)"), *self.init_body(block), Line("self.post_init()"))
        init = Function("__init__", (Param("config", ctx.config_class),), "None", init_body)
        forward = Function(
            "forward",
            tuple(ctx.model_inputs()),
            ctx.returns(block),
            (*body, Line(f"return {', '.join(result)}")),
            forward_comments,
        )
        return Class(ctx.class_name(block.name), ctx.pretrained_base, doc, (), (init, forward))
