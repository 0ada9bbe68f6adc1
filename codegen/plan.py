"""Every decision about the generated code, made in Python on the validated IR.

The templates only loop over what this module produces: class views with their lines already laid out.
Nothing is emitted for a feature a spec does not use: a block takes the rotary tables, the mask or the
cache only when its dataflow (or a block it calls) needs them.

Three kinds of module come out of a spec:
- plain blocks, `forward(x, <context>)`, where the context is what their dataflow needs (rope, mask, cache);
- input blocks: the backbone, and any block or head that holds it (DPR's encoders); they take the model's
  inputs (`input_ids`, `attention_mask`, ...) and pass them on;
- heads over the backbone, which call it and turn its output into the task's outputs, loss included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from specformer.dsl import ir
from specformer.dsl.analysis import CONTEXT, Facts, may_be_causal
from specformer.dsl.comments import CommentIndex
from specformer.dsl.errors import SpecError
from specformer.dsl.ir import calls_in, names_in, statement_exprs
from specformer.dsl.library import ACTIVATIONS, BUILTINS, PRIMITIVES, TASKS, Builtin

from .config_plan import ConfigView, is_literal, literal_source, plan_config, python_type
from .decoder_match import match_decoder
from .expressions import ExprEmitter
from .layout import INDENT, LINE_LENGTH, call_lines, statement_lines
from .spelling import atom as _atom
from .spelling import fill

_CONTEXT_PARAMS = {"rope": "rope: Rope", "mask": "mask: AttentionMask", "cache": "cache: Cache | None"}
_CONTEXT_TYPES = {
    "rope": ("rope", "Rope"),
    "mask": ("attention", "AttentionMask"),
    "cache": ("cache", "Cache"),
}


@dataclass
class ClassView:
    name: str
    base: str
    doc: str
    init_signature: str
    init_lines: list[str]
    forward_lines: list[str]  # the whole method, signature included, at class-body indentation
    methods: list[list[str]] = field(default_factory=list)
    attributes: list[str] = field(default_factory=list)


@dataclass
class ModelView:
    model: ir.ResolvedModel
    doc: str
    package: str
    config: ConfigView
    pretrained_base: str
    classes: list[ClassView]
    imports: list[str]
    exports: list[str]


def package_name(model: ir.ResolvedModel) -> str:
    return model.name.lower()


class Planner:
    def __init__(self, model: ir.ResolvedModel) -> None:
        self.model = model
        assert isinstance(model.facts, Facts), "plan a model from SpecSet.resolved(), which analyses it"
        self.facts: Facts = model.facts
        self.fields = {f.name: f for f in model.config.fields}
        self.blocks = {b.name: b for b in model.blocks}
        self.prefix = model.name
        self.config_class = f"{model.name}Config"
        self.pretrained_base = f"{model.name}PreTrainedModel"
        backbone = model.backbone
        assert backbone is not None and backbone.attr is not None
        self.backbone = backbone
        self.runtime: dict[str, set[str]] = {}
        self.comments = CommentIndex(model.comments)

    # ---- bookkeeping -----------------------------------------------------------------------------
    def use(self, module: str, *names: str) -> None:
        self.runtime.setdefault(module, set()).update(names)

    def class_name(self, block_name: str) -> str:
        return f"{self.prefix}{block_name}"

    def is_input_block(self, block: ir.Block) -> bool:
        return self.facts.takes_inputs(block.name)

    def calls(self, block: ir.Block) -> list[ir.Call]:
        assert block.forward is not None
        return block.forward.calls()

    def needs(self, block_name: str) -> frozenset[str]:
        """The implicit context (rope, mask, cache) a plain block's forward needs, through its children too."""
        return self.facts.needs[block_name]

    def _holds_inputs(self, sub: ir.Submodule) -> bool:
        return sub.kind == "block" and self.facts.takes_inputs(sub.target)

    def takes_layer_idx(self, block_name: str) -> bool:
        return block_name in self.facts.layer_idx_blocks

    def _forward_scalars(self, block: ir.Block) -> list[ir.Name]:
        """Config names a forward reads."""
        assert block.forward is not None
        return block.forward.free_names()

    def _layer_lets_in_forward(self, block: ir.Block) -> list[str]:
        return list(self.facts.per_layer_values[block.name])

    # ---- config expressions ----------------------------------------------------------------------
    def config_expr(
        self, owner: str, hoisted: frozenset[str] = frozenset(), options: frozenset[str] = frozenset()
    ) -> ExprEmitter:
        """Spells config expressions: `owner` is `config` in __init__ and `self.config` in forward.

        `let` values are resolved here: a constant is inlined, an alias of another field reads that
        field, a per-layer value reads the attribute its block computed in __init__ (`hoisted`), and any
        other `let` reads the config's property of that name.
        """

        def name(id_: str) -> str:
            if id_ == "layer_idx" or id_ in options:  # constructor arguments, kept on self for forward
                return id_ if owner == "config" else f"self.{id_}"
            field = self.fields.get(id_)
            if field is not None and field.computed:
                assert field.default is not None
                if is_literal(field):
                    return literal_source(field)
                if isinstance(field.default, ir.Name):
                    return name(field.default.id)
                if id_ in self.facts.layer_lets:
                    return f"self.{id_}" if id_ in hoisted else f"({emitter(field.default)})"
            return f"{owner}.{id_}"

        def call(node: ir.Call) -> str:
            raise SpecError("calls are not allowed in a config expression", node.pos)

        emitter = ExprEmitter(name, call)
        return emitter

    # ---- module construction ---------------------------------------------------------------------
    def construct(self, sub: ir.Submodule, options: frozenset[str] = frozenset()) -> str:
        expr = self.config_expr("config", options=options)
        if sub.kind == "block":
            target = self.blocks[sub.target]
            per_layer = (
                target.role == "block"
                and not self.is_input_block(target)
                and self.takes_layer_idx(sub.target)
            )
            args = ["config", "layer_idx"] if per_layer else ["config"]
            args += [f"{key}={expr(value)}" for key, value in sub.kwargs]  # backbone options
            built = f"{self.class_name(sub.target)}({', '.join(args)})"
        elif sub.kind == "repeat":
            assert sub.count is not None
            cls = self.class_name(sub.target)
            if self.takes_layer_idx(sub.target):
                built = f"nn.ModuleList({cls}(config, layer_idx) for layer_idx in range({expr(sub.count)}))"
            else:
                built = f"nn.ModuleList({cls}(config) for _ in range({expr(sub.count)}))"
        else:
            primitive = PRIMITIVES[sub.target]
            signature, callee, positional = primitive.signature, primitive.constructor, primitive.positional
            given = dict(zip(signature.names, sub.args, strict=False)) | dict(sub.kwargs)
            if primitive.module is not None:
                self.use(primitive.module, callee)
            args = [expr(given[name]) for name in signature.names[:positional]]
            defaults = {p.name: repr(p.default) for p in signature.params}
            for name in signature.names[positional:]:
                if name in given and expr(given[name]) != defaults[name]:
                    args.append(f"{name}={expr(given[name])}")
            built = f"{callee}({', '.join(args)})"
        if sub.condition is not None:
            return f"{built} if {expr(sub.condition)} else None"
        return built

    def init_lines(self, block: ir.Block) -> list[str]:
        options = frozenset(o.name for o in block.options)
        lines: list[str] = []
        read = {n.id for n in self._forward_scalars(block)}
        for option in block.options:
            if option.name in read:
                lines.append(f"self.{option.name} = {option.name}")
        plain = block.role == "block" and not self.is_input_block(block)  # models already keep `self.config`
        if plain and self._forward_reads_config(block):
            lines.append("self.config = config")
        if block.role == "block" and block.name in self.facts.layer_idx_kept:
            lines.append("self.layer_idx = layer_idx")
        for let in self._layer_lets_in_forward(block):
            # computed once per layer, as Hugging Face does for e.g. a layer's sliding window
            default = self.fields[let].default
            assert default is not None
            lines.append(f"self.{let} = {self.config_expr('config')(default)}")
        for sub in block.submodules:
            lines += [f"# {text}" for text in self.comments.take(sub.pos)]
            lines.append(f"self.{sub.name} = {self.construct(sub, options)}")
        for act in self._activation_fields(block):
            self.use("layers", "activation")
            lines.append(f"self.{act}_fn = activation(config.{act})")
        return lines

    def _activation_fields(self, block: ir.Block) -> list[str]:
        subs = {s.name for s in block.submodules}
        found: list[str] = []
        for call in self.calls(block):
            f = self.fields.get(call.func)
            if (
                call.func not in subs
                and f is not None
                and f.type.name == "activation"
                and call.func not in found
            ):
                found.append(call.func)
        return found

    def _forward_reads_config(self, block: ir.Block) -> bool:
        if any(c.func == "attend" for c in self.calls(block)):
            return True
        hoisted = set(self._layer_lets_in_forward(block))
        options = {o.name for o in block.options}
        for n in self._forward_scalars(block):
            if n.id == "layer_idx" or n.id in hoisted or n.id in options:
                continue
            field = self.fields.get(n.id)
            if field is not None and field.computed and is_literal(field):
                continue
            return True
        return False

    # ---- forward ---------------------------------------------------------------------------------
    def forward_emitter(self, block: ir.Block, context_names: dict[str, str]) -> ExprEmitter:
        subs = {s.name: s for s in block.submodules}
        locals_ = block.forward.local_names()
        options = frozenset(o.name for o in block.options)
        scalar = self.config_expr("self.config", frozenset(self._layer_lets_in_forward(block)), options)

        def name(id_: str) -> str:
            return id_ if id_ in locals_ else scalar.name(id_)

        emitter = ExprEmitter(name, lambda c: "")

        def call(node: ir.Call) -> str:
            args = [emitter(a) for a in node.args]
            sub = subs.get(node.func)
            if sub is not None:
                if sub.kind == "block" and self._holds_inputs(sub):
                    raise SpecError(
                        f"`{node.func}` reads the model inputs: call it in its own statement", node.pos
                    )
                if sub.kind == "block":
                    args += [context_names[c] for c in CONTEXT if c in self.needs(sub.target)]
                return f"self.{node.func}({', '.join(args)})"
            builtin = BUILTINS.get(node.func)
            if builtin is not None:
                return self._builtin(builtin, node, emitter, context_names)
            if node.func in self.fields:  # an activation chosen by the config
                return f"self.{node.func}_fn({args[0]})"
            activation = ACTIVATIONS[node.func]
            for module, imported in activation.imports:
                self.use(module, imported)
            return fill(activation.spelling, {"x": args[0]}, {"x"}, {})

        def binop(node: ir.BinOp) -> str | None:
            # act(gate) * up, the GLU product: one call, so a fused kernel can take it (set_kernels)
            gate = node.left
            if (
                node.op == "*"
                and isinstance(gate, ir.Call)
                and gate.func in self.fields
                and len(gate.args) == 1
            ):
                return f"self.{gate.func}_fn.gated({emitter(gate.args[0])}, {emitter(node.right)})"
            return None

        emitter.call = call
        emitter.binop = binop
        return emitter

    def _builtin(
        self, builtin: Builtin, node: ir.Call, emit: ExprEmitter, context_names: dict[str, str]
    ) -> str:
        signature = builtin.signature
        given = dict(zip(signature.names, node.args, strict=False)) | dict(node.kwargs)
        args = {p.name: emit(given[p.name]) if p.name in given else repr(p.default) for p in signature.params}
        for module, imported in builtin.imports:
            self.use(module, imported)
        context = {**context_names, "input_ids": "input_ids"}
        return fill(builtin.spelling, args, set(given), context)

    def statements(self, block: ir.Block, emit: ExprEmitter, context_names: dict[str, str]) -> list[str]:
        """The forward body; the final `return` comes back as its emitted values, as the last line."""
        assert block.forward is not None
        subs = {s.name: s for s in block.submodules}
        lines: list[str] = []
        body = block.forward.body
        for index, stmt in enumerate(body):
            lines += [f"# {text}" for text in self.comments.take(stmt.pos)]
            values = stmt.values if isinstance(stmt, ir.Return) else (stmt.value,)
            for value in values:
                lines.extend(self._cache_update(value, emit, context_names))
            if isinstance(stmt, ir.Return):
                only = stmt.values[0] if len(stmt.values) == 1 else None
                sub = subs.get(only.func) if isinstance(only, ir.Call) else None
                if sub is not None and self._holds_inputs(sub):
                    lines.append(self._input_call_expr(only, sub, emit))  # type: ignore[arg-type]
                else:
                    lines.append(", ".join(emit(v) for v in stmt.values))
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
                    lines.append(f"{target} = {source}")
                ctx = [context_names[c] for c in CONTEXT if c in self.needs(sub.target)]
                lines.append(f"for layer in self.{sub.name}:")
                lines.append(f"{INDENT}{target} = layer({', '.join([target, *ctx])})")
                continue
            if sub is not None and self._holds_inputs(sub):
                lines += self._input_call(stmt, sub, emit)
                continue
            lines.append(f"{', '.join(stmt.targets)} = {emit(value)}{_shape_comment(value)}")
        return lines

    def _input_call_expr(self, call: ir.Call, sub: ir.Submodule, emit: ExprEmitter) -> str:
        """`bert_model(input_ids, token_type_ids)`: the spec's inputs by name, the rest passed along."""
        callee = self.blocks[sub.target]
        assert callee.forward is not None
        given = {p: emit(a) for p, a in zip(callee.forward.params, call.args, strict=False)}
        names = [n for n, _, _ in self.model_inputs()]
        args = [given.get("input_ids", "input_ids")]
        args += [f"{n}={given.get(n, n)}" for n in names[1:]]
        return f"self.{sub.name}({', '.join(args)})"

    def _input_call(self, stmt: ir.Assign, sub: ir.Submodule, emit: ExprEmitter) -> list[str]:
        assert isinstance(stmt.value, ir.Call)
        callee = self.blocks[sub.target]
        call = self._input_call_expr(stmt.value, sub, emit)
        if callee.role != "backbone":
            return [f"{', '.join(stmt.targets)} = {call}"]
        fields = ["last_hidden_state", "pooler_output"][: len(stmt.targets)]
        return [f"out = {call}", f"{', '.join(stmt.targets)} = {', '.join(f'out.{f}' for f in fields)}"]

    def _cache_update(self, expr: ir.Expr, emit: ExprEmitter, context_names: dict[str, str]) -> list[str]:
        lines: list[str] = []
        for call in calls_in(expr):
            if call.func != "attend" or not may_be_causal(call) or "cache" not in context_names:
                continue
            k, v = call.args[1], call.args[2]
            if not (isinstance(k, ir.Name) and isinstance(v, ir.Name)):
                raise SpecError(
                    "name the keys and values given to `attend` (`k = ...`) to cache them", call.pos
                )
            cache = context_names["cache"]
            lines.append(f"if {cache} is not None:")
            lines.append(f"{INDENT}{k.id}, {v.id} = {cache}.update(self.layer_idx, {k.id}, {v.id})")
        return lines

    # ---- classes ---------------------------------------------------------------------------------
    def docstring(self, block: ir.Block) -> str:
        comment = self.comments.take(block.pos, above_only=True)
        return _docstring(comment, INDENT) if comment else ""

    def forward_comments(self, block: ir.Block) -> list[str]:
        assert block.forward is not None
        return self.comments.take(block.forward.pos, above_only=True)

    def _returns(self, block: ir.Block) -> str:
        count = self.facts.returns[block.name]
        return "torch.Tensor" if count == 1 else f"tuple[{', '.join(['torch.Tensor'] * count)}]"

    def plan_block(self, block: ir.Block) -> ClassView:
        if self.is_input_block(block):
            return self.plan_input_block(block)
        doc, comments = self.docstring(block), self.forward_comments(block)
        needs = self.needs(block.name)
        context_names = {c: c for c in needs}
        emit = self.forward_emitter(block, context_names)
        assert block.forward is not None
        params = [f"{p}: torch.Tensor" for p in block.forward.params]
        for c in CONTEXT:
            if c in needs:
                params.append(_CONTEXT_PARAMS[c])
                self.use(*_CONTEXT_TYPES[c])
        body = self.statements(block, emit, context_names)
        body[-1] = f"return {body[-1]}"
        takes_idx = self.takes_layer_idx(block.name)
        return ClassView(
            name=self.class_name(block.name),
            base="nn.Module",
            doc=doc,
            init_signature=f"self, config: {self.config_class}" + (", layer_idx: int" if takes_idx else ""),
            init_lines=["super().__init__()", *self.init_lines(block)],
            forward_lines=_method("forward", params, self._returns(block), body, comments),
        )

    def model_inputs(self) -> list[tuple[str, str, str | None]]:
        """(name, annotation, default) of the model's inputs, shared by the backbone and every head."""
        needs = self.needs(self.backbone.name)
        assert self.backbone.forward is not None
        declared = self.backbone.forward.params
        inputs: list[tuple[str, str, str | None]] = [("input_ids", "torch.Tensor", None)]
        inputs.append(("attention_mask", "torch.Tensor | None", "None"))
        for name in ("token_type_ids", "position_ids"):
            if name in declared or (name == "position_ids" and "rope" in needs):
                inputs.append((name, "torch.Tensor | None", "None"))
        if "cache" in needs:
            self.use("cache", "Cache")
            inputs.append(("past_key_values", "Cache | None", "None"))
            inputs.append(("use_cache", "bool", "False"))
        return inputs

    def _input_params(self) -> list[str]:
        return [f"{n}: {a}" + (f" = {d}" if d is not None else "") for n, a, d in self.model_inputs()]

    def plan_input_block(self, block: ir.Block) -> ClassView:
        """A block holding the backbone (DPR's encoder): model inputs in, tensors out."""
        doc, comments = self.docstring(block), self.forward_comments(block)
        emit = self.forward_emitter(block, {})
        body = self.statements(block, emit, {})
        body[-1] = f"return {body[-1]}"
        return ClassView(
            name=self.class_name(block.name),
            base=self.pretrained_base,
            doc=doc,
            init_signature=f"self, config: {self.config_class}",
            init_lines=["super().__init__(config)", *self.init_lines(block), "self.post_init()"],
            forward_lines=_method("forward", self._input_params(), self._returns(block), body, comments),
        )

    def plan_backbone(self) -> ClassView:
        block = self.backbone
        doc, comments = self.docstring(block), self.forward_comments(block)
        needs = self.needs(block.name)
        context_names = {"rope": "rope", "mask": "mask", "cache": "past_key_values"}
        emit = self.forward_emitter(block, context_names)
        names = {n for n, _, _ in self.model_inputs()}
        self.use("outputs", "BaseModelOutput")
        body: list[str] = []
        if "cache" in needs:
            self.use("cache", "DynamicCache")
            body += [
                "if use_cache and past_key_values is None:",
                f"{INDENT}past_key_values = DynamicCache()",
                "past = past_key_values.get_seq_length() if past_key_values is not None else 0",
            ]
        if needs & {"mask", "rope"} or "position_ids" in names:
            self.use("attention", "AttentionMask")
            past = ", past, past_key_values" if "cache" in needs else ""
            body.append(f"mask = AttentionMask(attention_mask, input_ids.shape[1]{past})")
        if "position_ids" in names:
            body += [
                "if position_ids is None:",
                f"{INDENT}position_ids = mask.position_ids(input_ids.device)",
            ]
        if "token_type_ids" in names:
            body += ["if token_type_ids is None:", f"{INDENT}token_type_ids = torch.zeros_like(input_ids)"]
        if "rope" in needs:
            rotary = next(s.name for s in block.submodules if s.kind == "primitive" and s.target == "Rotary")
            body.append(f"rope = self.{rotary}(position_ids)")
        statements = self.statements(block, emit, context_names)
        result = statements.pop()
        body += statements
        outputs = ["last_hidden_state", "pooler_output"]
        values = [f"{n}={v}" for n, v in zip(outputs, _split_top_level(result), strict=False)]
        if "cache" in needs:
            values.append("past_key_values=past_key_values")
        body.append(f"return BaseModelOutput({', '.join(values)})")
        options = "".join(f", {o.name}: {python_type(o)} = {literal_source(o)}" for o in block.options)
        return ClassView(
            name=self.class_name(block.name),
            base=self.pretrained_base,
            doc=doc,
            init_signature=f"self, config: {self.config_class}{options}",
            init_lines=["super().__init__(config)", *self.init_lines(block), "self.post_init()"],
            forward_lines=_method("forward", self._input_params(), "BaseModelOutput", body, comments),
        )

    def plan_head(self, head: ir.Block) -> ClassView:
        assert head.forward is not None and head.task is not None
        doc, comments = self.docstring(head), self.forward_comments(head)
        task = TASKS[head.task]
        outputs = task.outputs
        emit = self.forward_emitter(head, {})
        inputs = self.model_inputs()
        names = [n for n, _, _ in inputs]
        params = self._input_params() + [f"{label}: torch.Tensor | None = None" for label in task.labels]
        body: list[str] = []
        init = ["super().__init__(config)"]
        attributes: list[str] = []
        explicit = self.is_input_block(head)  # the head holds the backbone itself, where it chose
        if head.task == "multiple_choice":
            # (batch, choices, length) inputs become (batch * choices, length) rows
            body.append("num_choices = input_ids.shape[1]")
            for n, _, _ in inputs[: 4 if "use_cache" not in names else len(inputs)]:
                if n in ("input_ids", "attention_mask", "token_type_ids", "position_ids"):
                    flat = (
                        f"{n}.flatten(0, 1)"
                        if n == "input_ids"
                        else f"{n}.flatten(0, 1) if {n} is not None else None"
                    )
                    body.append(f"{n} = {flat}")
        if not explicit:
            attr = head.attr or self.backbone.attr
            assert attr is not None
            if attr != self.backbone.attr:
                attributes.append(f'base_model_prefix = "{attr}"')
            expr = self.config_expr("config")
            args = ["config", *(f"{k}={expr(v)}" for k, v in head.backbone_args)]
            init.append(f"self.{attr} = {self.class_name(self.backbone.name)}({', '.join(args)})")
            body.append(f"out = self.{attr}({', '.join([names[0], *(f'{n}={n}' for n in names[1:])])})")
            sources = ["out.last_hidden_state", "out.pooler_output"]
            if head.task == "causal_lm":
                self.use("losses", "keep_last")
                params.append("logits_to_keep: int | torch.Tensor = 0")
                # the label tokens of a whole gradient-accumulation window, which the summed loss is divided by
                params.append("num_items_in_batch: int | torch.Tensor | None = None")
                sources[0] = "keep_last(out.last_hidden_state, logits_to_keep)"
            read = {n.id for e in head.forward.expressions() for n in names_in(e)}
            bound = [(p, s) for p, s in zip(head.forward.params, sources, strict=False) if p in read]
            if bound:
                body.append(f"{', '.join(p for p, _ in bound)} = {', '.join(s for _, s in bound)}")
        else:
            holder = next(s.name for s in head.submodules if self._holds_inputs(s))
            attributes.append(f'base_model_prefix = "{holder}"')
        statements = self.statements(head, emit, {})
        result = statements.pop()
        body += statements
        projection = self._plain_projection(head) if head.task == "causal_lm" else None
        if projection is not None:
            self.use("losses", "linear_cross_entropy")
            past = ", past_key_values=out.past_key_values" if "past_key_values" in names else ""
            body += [
                "if labels is not None and self.training:",
                f"{INDENT}# Training needs only the loss: fused with the head's matmul, chunk by chunk, the",
                f"{INDENT}# (tokens x vocab) logits are never built whole (outputs carry no logits here).",
                f"{INDENT}loss = linear_cross_entropy({projection[1]}, self.{projection[0]}, labels, "
                "num_items_in_batch)",
                f"{INDENT}return {task.output}(loss=loss{past})",
            ]
        if task.loss is None and len(outputs) == 1 and result.isidentifier():
            outputs = (f"{outputs[0]}={result}",)  # hand the named value straight to the output
        else:
            body.append(f"{', '.join(outputs)} = {result}")
        if head.task == "multiple_choice":
            body.append("logits = logits.view(-1, num_choices)")
        self.use("outputs", task.output)
        fields = [o if "=" in o else f"{o}={o}" for o in outputs]
        if task.loss is not None:
            assert task.loss_function is not None
            self.use("losses", task.loss_function)
            present = " and ".join(f"{label} is not None" for label in task.labels)
            body += ["loss = None", f"if {present}:", f"{INDENT}loss = {task.loss}"]
            fields.append("loss=loss")
        if not explicit and "past_key_values" in names:
            fields.append("past_key_values=out.past_key_values")
        body.append(f"return {task.output}({', '.join(fields)})")
        methods = []
        if head.ties:
            methods.append(self._tied_weights(head))
        if head.task == "causal_lm":
            self.use("modeling", "generation_defaults")
            methods.append(
                _method(
                    "generation_defaults", [], "dict[str, Any]", ["return generation_defaults(self.config)"]
                )
            )
            if projection is not None and not explicit:
                methods += self._decoder_layout(head.attr or self.backbone.attr, projection[0])
        attributes += _dict_attribute("tp_plan", self.tp_plan(head))
        return ClassView(
            name=self.class_name(head.name),
            base=self.pretrained_base,
            doc=doc,
            init_signature=f"self, config: {self.config_class}",
            init_lines=[*init, *self.init_lines(head), "self.post_init()"],
            forward_lines=_method("forward", params, task.output, body, comments),
            methods=methods,
            attributes=attributes,
        )

    def _decoder_layout(self, backbone: str | None, lm_head: str) -> list[list[str]]:
        """`decoder_layout()`, naming the modules for the fused CPU decode step, when the spec's decoder
        is exactly its dataflow (`decoder_match`); nothing otherwise."""
        activations = {n for n, f in self.fields.items() if f.type.name == "activation"}
        found = match_decoder(self.model, activations)
        if found is None or backbone is None:
            return []
        self.use("fused_decode", "DecoderLayout")
        self.use("fused_decode", "LayerLayout")
        attn, mlp = f"layer.{found.attn}", f"layer.{found.mlp}"
        window = "None"
        if found.window is not None:  # spelled as the attention block's forward reads it, from the layer
            block = self.model.block(found.attention_block)
            window = re.sub(r"\bself\.", f"{attn}.", self.forward_emitter(block, {})(found.window))
        layer = [
            f"input_norm=layer.{found.input_norm}",
            *(f"{k}={attn}.{getattr(found, f'{k}_proj')}" for k in ("q", "k", "v", "o")),
            f"post_norm=layer.{found.post_norm}",
            *(f"{k}={mlp}.{getattr(found, f'{k}_proj')}" for k in ("gate", "up", "down")),
            f"act={mlp}.{found.act}_fn",
            f"window={window}",
        ]
        model = f"self.{backbone}"
        fields = [
            f"head_dim={self.config_expr('self.config')(found.head_dim)}",
            f"embed={model}.{found.embed}",
            f"layers=[LayerLayout({', '.join(layer)}) for layer in {model}.{found.layers}]",
            f"norm={model}.{found.norm}",
            f"rotary={model}.{found.rotary}",
            f"head=self.{lm_head}",
        ]
        body = [f"return DecoderLayout({', '.join(fields)})"]
        comments = [
            "The decoder is exactly the dataflow specformer's fused CPU decode step runs (pre-norm, rotary,",
            "gated MLP): its modules, for generate() on the CPU. See specformer/runtime/fused_decode.py.",
        ]
        return [_method("decoder_layout", [], "DecoderLayout", body, comments)]

    def _plain_projection(self, head: ir.Block) -> tuple[str, str] | None:
        """(Linear submodule, its input) when the head's forward is just `return proj(h)`: the logits are
        one matmul of the hidden states, which the fused training loss can take over."""
        assert head.forward is not None
        body = head.forward.body
        if len(body) != 1 or not isinstance(body[0], ir.Return) or len(body[0].values) != 1:
            return None
        value = body[0].values[0]
        if not (isinstance(value, ir.Call) and len(value.args) == 1 and not value.kwargs):
            return None
        (arg,) = value.args
        sub = next((s for s in head.submodules if s.name == value.func), None)
        if sub is None or sub.kind != "primitive" or sub.target != "Linear" or sub.condition is not None:
            return None
        if not (isinstance(arg, ir.Name) and arg.id in head.forward.params):
            return None
        return sub.name, arg.id

    def tp_plan(self, block: ir.Block, prefix: str = "") -> dict[str, str]:
        """Module path patterns (`layers.*.self_attn.q_proj`) -> parallel style, from `parallel` lines."""
        plan = {f"{prefix}{name}": entry.style for entry in block.parallel for name in entry.names}
        for sub in block.submodules:
            if sub.kind == "block":
                plan |= self.tp_plan(self.blocks[sub.target], f"{prefix}{sub.name}.")
            elif sub.kind == "repeat":
                plan |= self.tp_plan(self.blocks[sub.target], f"{prefix}{sub.name}.*.")
        return plan

    def _tied_weights(self, head: ir.Block) -> list[str]:
        emit = self.config_expr("self.config")
        pairs = [(f'"{t.name}.weight"', f'"{".".join(t.target)}.weight"', t.condition) for t in head.ties]
        if len(pairs) == 1 and pairs[0][2] is not None:
            key, value, condition = pairs[0]
            assert condition is not None
            body = [f"if not {_atom(emit(condition))}:", f"{INDENT}return {{}}", f"return {{{key}: {value}}}"]
        else:
            body = ["ties: dict[str, str] = {}"]
            for key, value, condition in pairs:
                if condition is None:
                    body.append(f"ties[{key}] = {value}")
                else:
                    body += [f"if {emit(condition)}:", f"{INDENT}ties[{key}] = {value}"]
            body.append("return ties")
        return _method("tied_weights", [], "dict[str, str]", body)

    # ---- everything ------------------------------------------------------------------------------
    def plan(self) -> ModelView:
        model_comment = self.comments.take(self.model.pos, above_only=True)
        doc = _docstring(model_comment or [f"{self.model.name}, generated from its spec."], "")
        config = plan_config(
            self.model,
            list(self.facts.field_order),
            self.facts.layer_lets,
            self.config_expr("self"),
            f"Configuration of {self.model.name} models; fields and defaults as in its spec.",
        )
        pretrained = ClassView(
            name=self.pretrained_base,
            base="PreTrainedModel",
            doc="",
            init_signature="",
            init_lines=[],
            forward_lines=[],
            attributes=[
                f"config_class = {self.config_class}",
                f'base_model_prefix = "{self.backbone.attr}"',
                *_dict_attribute("base_model_tp_plan", self.tp_plan(self.backbone)),
            ],
        )
        self.use("modeling", "PreTrainedModel")
        plain = [self.plan_block(self.blocks[n]) for n in self._block_order() if not self._is_input(n)]
        backbone = self.plan_backbone()
        holders = [self.plan_block(self.blocks[n]) for n in self._block_order() if self._is_input(n)]
        heads = [self.plan_head(h) for h in self.model.heads]
        classes = [*plain, pretrained, backbone, *holders, *heads]
        return ModelView(
            model=self.model,
            doc=doc,
            package=package_name(self.model),
            config=config,
            pretrained_base=self.pretrained_base,
            classes=classes,
            imports=self._imports(classes),
            exports=[config.name, *_isort({c.name for c in classes if c.base != "nn.Module"})],
        )

    def _is_input(self, name: str) -> bool:
        return self.is_input_block(self.blocks[name])

    def _block_order(self) -> list[str]:
        """Blocks other than the backbone and heads, children first, that something uses."""
        return [
            n
            for n in self.facts.children_first
            if self.blocks[n].role == "block" and n in self.facts.reachable
        ]

    def _imports(self, classes: list[ClassView]) -> list[str]:
        """Import lines in the order ruff's isort wants: plain imports, then `from` imports by module."""
        method_lines = [line for c in classes for method in c.methods for line in method]
        code = "\n".join(line for c in classes for line in [*c.init_lines, *c.forward_lines, *method_lines])
        lines = ["import torch"]
        if "F." in code:
            lines.append("import torch.nn.functional as F")
        lines += ["from torch import nn", ""]
        for module in sorted(self.runtime):
            names = _isort(self.runtime[module])
            line = f"from specformer.runtime.{module} import {', '.join(names)}"
            if len(line) > LINE_LENGTH:  # isort: one name per line once wrapped
                lines += [
                    f"from specformer.runtime.{module} import (",
                    *(f"{INDENT}{n}," for n in names),
                    ")",
                ]
            else:
                lines.append(line)
        return lines


def _isort(names: set[str]) -> list[str]:
    """isort's order inside one `from` import: CONSTANTS, then Classes, then functions."""
    return sorted(names, key=lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n))


def _method(
    name: str, params: list[str], returns: str, body: list[str], comments: list[str] = ()
) -> list[str]:
    head = [f"{INDENT}# {text}" for text in comments]
    signature = call_lines(INDENT, f"def {name}(", ["self", *params], f") -> {returns}:")
    if len(signature) > 1 and not signature[-2].endswith(","):
        # ruff puts each parameter on its own line once a signature is split
        signature = [
            signature[0],
            *(f"{INDENT * 2}{p}," for p in ["self", *params]),
            f"{INDENT}) -> {returns}:",
        ]
    lines = head + signature
    for line in body:
        indent = INDENT * 2 + " " * (len(line) - len(line.lstrip(" ")))
        lines.extend(statement_lines(indent, line.lstrip(" ")))
    return lines


def _docstring(lines: list[str], indent: str) -> str:
    """Comment lines as a docstring, quotes included. Quotes and backslashes in the text are replaced so
    nothing in a comment can end or escape the string."""
    safe = [line.replace("\\", "/").replace('"', "'") for line in lines]
    if len(safe) == 1:
        return f'"""{safe[0]}"""'
    body = "\n".join(f"{indent}{line}" if i else line for i, line in enumerate(safe))
    return f'"""{body}\n{indent}"""'


def _split_top_level(text: str) -> list[str]:
    from .layout import split_args

    return split_args(text)


def _shape_comment(expr: ir.Expr) -> str:
    if isinstance(expr, ir.Call) and expr.func == "split_heads":
        return "  # (B, H, T, D)"
    return ""


def plan(model: ir.ResolvedModel) -> ModelView:
    return Planner(model).plan()


def _dict_attribute(name: str, values: dict[str, str]) -> list[str]:
    """`name = {...}` as one class attribute, an entry per line (the trailing comma keeps ruff's layout)."""
    if not values:
        return []
    entries = "".join(f'\n{INDENT * 2}"{k}": "{v}",' for k, v in values.items())
    return [f"{name}: ClassVar[dict[str, str]] = {{{entries}\n{INDENT}}}"]
