"""Every decision about the generated code, made in Python on the validated IR.

The templates only loop over what this module produces: class views with their lines already laid out.
Nothing is emitted for a feature a spec does not use: a block takes the rotary tables, the mask or the
cache only when its dataflow (or a block it calls) needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specformer.dsl import ir
from specformer.dsl.comments import CommentIndex
from specformer.dsl.errors import SpecError
from specformer.dsl.primitives import ACTIVATIONS, PRIMITIVES
from specformer.dsl.validate import names_in, walk

from .expressions import ExprEmitter
from .layout import INDENT, call_lines, statement_lines

# Implicit context a block can need, in the order it is passed.
CONTEXT = ("rope", "mask", "cache")
_CONTEXT_PARAMS = {"rope": "rope: Rope", "mask": "mask: AttentionMask", "cache": "cache: Cache | None"}

# Primitive -> (constructor, how many leading arguments are passed positionally, runtime module to import
# it from, or None for torch.nn). Optional arguments the spec does not give are left to their defaults.
_PRIMITIVE_EMISSION: dict[str, tuple[str, int, str | None]] = {
    "Linear": ("nn.Linear", 2, None),
    "Embedding": ("nn.Embedding", 2, None),
    "LayerNorm": ("nn.LayerNorm", 1, None),
    "Dropout": ("nn.Dropout", 1, None),
    "RMSNorm": ("RMSNorm", 1, "layers"),
    "Rotary": ("RotaryEmbedding", 3, "rope"),
}

_TORCH_ACTIVATIONS = {
    "silu": "F.silu({})",
    "swish": "F.silu({})",
    "gelu": "F.gelu({})",
    "gelu_pytorch_tanh": 'F.gelu({}, approximate="tanh")',
    "relu": "F.relu({})",
    "tanh": "torch.tanh({})",
    "sigmoid": "torch.sigmoid({})",
}

_PY_TYPES = {
    "int": "int",
    "float": "float",
    "bool": "bool",
    "str": "str",
    "activation": "str",
    "rope": "dict",
    "list": "list",
    "dict": "dict",
    "any": "Any",
    "enum": "str",
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
class ConfigView:
    name: str
    model_type: str
    doc: str
    attribute_map: list[tuple[str, str]]
    params: list[str]
    body: list[str]
    field_types: list[tuple[str, str]]
    uses_any: bool


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
        self.fields = {f.name: f for f in model.config.fields}
        self.aliases = {a.alias: a.target for a in model.config.aliases}
        self.blocks = {b.name: b for b in model.blocks}
        self.prefix = model.name
        self.config_class = f"{model.name}Config"
        self.pretrained_base = f"{model.name}PreTrainedModel"
        self.backbone = model.backbone
        self.runtime: dict[str, set[str]] = {}
        self.torch_names: set[str] = {"torch", "nn"}
        self._needs: dict[str, frozenset[str]] = {}
        self.comments = CommentIndex(model.comments)
        self._layer_idx: dict[str, bool] = {}

    # ---- bookkeeping -----------------------------------------------------------------------------
    def use(self, module: str, *names: str) -> None:
        self.runtime.setdefault(module, set()).update(names)

    def class_name(self, block_name: str) -> str:
        return f"{self.prefix}{block_name}"

    # ---- analysis --------------------------------------------------------------------------------
    def calls(self, block: ir.Block) -> list[ir.Call]:
        assert block.forward is not None
        found: list[ir.Call] = []
        for stmt in block.forward.body:
            found.extend(_calls_in(stmt.value))
        return found

    def needs(self, block_name: str) -> frozenset[str]:
        """The implicit context (rope, mask, cache) a block's forward needs, including through children."""
        if block_name in self._needs:
            return self._needs[block_name]
        block = self.blocks[block_name]
        subs = {s.name: s for s in block.submodules}
        needed: set[str] = set()
        for call in self.calls(block):
            if call.func == "rotary" and call.func not in subs:
                needed.add("rope")
            elif call.func == "attend" and call.func not in subs:
                needed.add("mask")
                if _may_be_causal(call):
                    needed.add("cache")
            elif call.func in subs and subs[call.func].kind in ("block", "repeat"):
                needed |= self.needs(subs[call.func].target)
        result = frozenset(needed)
        if block.role == "block":
            self._needs[block_name] = result
        return result

    def takes_layer_idx(self, block_name: str) -> bool:
        if block_name not in self._layer_idx:
            block = self.blocks[block_name]
            uses = "cache" in self._own_needs(block) or self._reads_layer_idx(block)
            children = any(s.kind == "block" and self.takes_layer_idx(s.target) for s in block.submodules)
            self._layer_idx[block_name] = uses or children
        return self._layer_idx[block_name]

    def _own_needs(self, block: ir.Block) -> set[str]:
        subs = {s.name for s in block.submodules}
        return {
            "cache"
            for c in self.calls(block)
            if c.func == "attend" and c.func not in subs and _may_be_causal(c)
        }

    def _reads_layer_idx(self, block: ir.Block) -> bool:
        exprs: list[ir.Expr] = [stmt.value for stmt in block.forward.body] if block.forward else []
        for sub in block.submodules:
            exprs.extend(sub.args)
            exprs.extend(v for _, v in sub.kwargs)
        return any(n.id == "layer_idx" for e in exprs for n in names_in(e))

    # ---- expressions -----------------------------------------------------------------------------
    def config_name(self, owner: str) -> ExprEmitter:
        """Emitter for config expressions; `owner` is `config` in __init__ and `self.config` in forward."""

        def name(id_: str) -> str:
            if id_ == "layer_idx":
                return "layer_idx" if owner == "config" else "self.layer_idx"
            return f"{owner}.{id_}"

        def call(node: ir.Call) -> str:
            raise SpecError("calls are not allowed in a config expression", node.pos)

        return ExprEmitter(name, call)

    # ---- config ----------------------------------------------------------------------------------
    def plan_config(self) -> ConfigView:
        params: list[str] = []
        plain: list[str] = []
        derived: list[str] = []
        field_types: list[tuple[str, str]] = []
        literal = ExprEmitter(lambda n: n, self._no_call)
        uses_any = False
        body: list[str] = []
        for alias, target in self.aliases.items():
            body.append(f'if "{alias}" in kwargs:')
            body.append(f'{INDENT}{target} = kwargs.pop("{alias}")')
        for f in self.model.config.fields:
            py = _PY_TYPES[f.type.name]
            uses_any |= py == "Any"
            type_name = f"enum:{'|'.join(f.type.choices)}" if f.type.name == "enum" else f.type.name
            field_types.append((f.name, type_name + ("?" if f.type.optional else "")))
            optional = f.type.optional or py == "Any"
            if f.default is None:
                params.append(f"{f.name}: {py}{' | None' if optional and py != 'Any' else ''}")
                plain.append(f"self.{f.name} = {f.name}")
            elif f.type.name == "rope":
                params.append(f"{f.name}: dict | None = None")
                theta = (
                    next((v for k, v in f.default.kwargs if k == "theta"), None)
                    if isinstance(f.default, ir.Call)
                    else None
                )
                theta_src = literal(theta) if theta is not None else "10000.0"
                max_pos = (
                    "self.max_position_embeddings" if "max_position_embeddings" in self.fields else "None"
                )
                derived.append(
                    f"self.{f.name} = standardize_rope({f.name}, kwargs, theta={theta_src}, "
                    f"max_position_embeddings={max_pos})"
                )
            elif _is_literal(f):
                value = self._literal_default(f, literal)
                annotation = f"{py} | None" if f.type.optional and py != "Any" else py
                params.append(f"{f.name}: {annotation} = {value}")
                plain.append(f"self.{f.name} = {f.name}")
            else:
                # A default computed from other fields, as Hugging Face does for `head_dim`.
                annotation = py if py == "Any" else f"{py} | None"
                params.append(f"{f.name}: {annotation} = None")
                expr = ExprEmitter(lambda n: f"self.{n}", self._no_call)(f.default)
                derived.append(f"self.{f.name} = {expr} if {f.name} is None else {f.name}")
        body.extend(plain)
        body.extend(derived)
        return ConfigView(
            name=self.config_class,
            model_type=self.model.model_type,
            doc=f"Configuration of {self.model.name} models; fields and defaults as in its spec.",
            attribute_map=sorted(self.aliases.items()),
            params=params,
            body=[line for b in body for line in statement_lines(INDENT * 2, b)],
            field_types=field_types,
            uses_any=uses_any,
        )

    def _literal_default(self, f: ir.ConfigField, literal: ExprEmitter) -> str:
        assert f.default is not None
        if isinstance(f.default, ir.Name):  # activation or enum spelled as a bare name
            return f'"{f.default.id}"'
        return literal(f.default)

    @staticmethod
    def _no_call(node: ir.Call) -> str:
        raise SpecError("calls are not allowed in a config expression", node.pos)

    # ---- module construction ---------------------------------------------------------------------
    def construct(self, sub: ir.Submodule) -> str:
        expr = self.config_name("config")
        if sub.kind == "block":
            args = "config, layer_idx" if self.takes_layer_idx(sub.target) else "config"
            return f"{self.class_name(sub.target)}({args})"
        if sub.kind == "repeat":
            assert sub.count is not None
            cls = self.class_name(sub.target)
            if self.takes_layer_idx(sub.target):
                return f"nn.ModuleList({cls}(config, layer_idx) for layer_idx in range({expr(sub.count)}))"
            return f"nn.ModuleList({cls}(config) for _ in range({expr(sub.count)}))"
        signature = PRIMITIVES[sub.target]
        callee, positional, runtime_module = _PRIMITIVE_EMISSION[sub.target]
        if runtime_module is not None:
            self.use(runtime_module, callee)
        given = dict(zip(signature.names, sub.args, strict=False)) | dict(sub.kwargs)
        args = [expr(given[name]) for name in signature.names[:positional]]
        args += [f"{name}={expr(given[name])}" for name in signature.names[positional:] if name in given]
        return f"{callee}({', '.join(args)})"

    def init_lines(self, block: ir.Block) -> list[str]:
        lines: list[str] = []
        forward_reads_config = self._forward_reads_config(block)
        if forward_reads_config:
            lines.append("self.config = config")
        if (
            block.role == "block"
            and self.takes_layer_idx(block.name)
            and self._forward_reads_layer_idx(block)
        ):
            lines.append("self.layer_idx = layer_idx")
        for sub in block.submodules:
            lines += [f"# {text}" for text in self.comments.take(sub.pos)]
            lines.append(f"self.{sub.name} = {self.construct(sub)}")
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

    def _forward_scalars(self, block: ir.Block) -> list[ir.Name]:
        """Config names a forward reads (outside of calls to activation fields)."""
        assert block.forward is not None
        locals_: set[str] = set(block.forward.params)
        for stmt in block.forward.body:
            if isinstance(stmt, ir.Assign):
                locals_.update(stmt.targets)
        return [n for stmt in block.forward.body for n in names_in(stmt.value) if n.id not in locals_]

    def _forward_reads_config(self, block: ir.Block) -> bool:
        if block.role != "block":
            return False  # backbones and heads inherit `self.config` from the model base class
        if any(c.func == "attend" for c in self.calls(block)):
            return True
        return any(n.id != "layer_idx" for n in self._forward_scalars(block))

    def _forward_reads_layer_idx(self, block: ir.Block) -> bool:
        return "cache" in self._own_needs(block) or any(
            n.id == "layer_idx" for n in self._forward_scalars(block)
        )

    # ---- forward ---------------------------------------------------------------------------------
    def forward_emitter(self, block: ir.Block, context_names: dict[str, str]) -> ExprEmitter:
        subs = {s.name: s for s in block.submodules}
        assert block.forward is not None
        locals_: set[str] = set(block.forward.params)
        for stmt in block.forward.body:
            if isinstance(stmt, ir.Assign):
                locals_.update(stmt.targets)
        scalar = self.config_name("self.config")

        def name(id_: str) -> str:
            return id_ if id_ in locals_ else scalar.name(id_)

        emitter = ExprEmitter(name, lambda c: "")

        def call(node: ir.Call) -> str:
            args = [emitter(a) for a in node.args]
            sub = subs.get(node.func)
            if sub is not None:
                if sub.kind == "block":
                    args += [context_names[c] for c in CONTEXT if c in self.needs(sub.target)]
                return f"self.{node.func}({', '.join(args)})"
            if node.func == "split_heads":
                return f"{_atom(args[0])}.unflatten(-1, (-1, {args[1]})).transpose(1, 2)"
            if node.func == "merge_heads":
                return f"{_atom(args[0])}.transpose(1, 2).flatten(2)"
            if node.func == "rotary":
                self.use("rope", "apply_rotary")
                return f"apply_rotary({args[0]}, {args[1]}, {context_names['rope']})"
            if node.func == "attend":
                return self._attend(node, emitter, context_names)
            if node.func == "dropout":
                return f"F.dropout({args[0]}, p={args[1]}, training=self.training)"
            if node.func == "first_token":
                return f"{_atom(args[0])}[:, 0]"
            if node.func == "last_token":
                self.use("losses", "last_token")
                return f"last_token({args[0]}, input_ids, self.config.pad_token_id)"
            if node.func in self.fields:  # an activation chosen by the config
                return f"self.{node.func}_fn({args[0]})"
            if node.func in _TORCH_ACTIVATIONS:
                if node.func != "tanh" and node.func != "sigmoid":
                    self.torch_names.add("F")
                return _TORCH_ACTIVATIONS[node.func].format(args[0])
            if node.func in ACTIVATIONS:
                self.use("layers", "ACTIVATIONS")
                return f'ACTIVATIONS["{node.func}"]({args[0]})'
            raise SpecError(f"cannot emit a call to `{node.func}`", node.pos)  # pragma: no cover

        emitter.call = call
        return emitter

    def _attend(self, node: ir.Call, emit: ExprEmitter, context_names: dict[str, str]) -> str:
        self.use("attention", "attend")
        q, k, v = (emit(a) for a in node.args[:3])
        parts = [q, k, v, context_names["mask"]]
        kwargs = dict(node.kwargs)
        parts.append(f"causal={emit(kwargs['causal'])}" if "causal" in kwargs else "causal=False")
        if "window" in kwargs:
            parts.append(f"window={emit(kwargs['window'])}")
        if "dropout" in kwargs:
            parts.append(f"dropout={_atom(emit(kwargs['dropout']))} if self.training else 0.0")
        if "scale" in kwargs:
            parts.append(f"scale={emit(kwargs['scale'])}")
        parts.append("impl=self.config.attn_implementation")
        return f"attend({', '.join(parts)})"

    def statements(self, block: ir.Block, emit: ExprEmitter, context_names: dict[str, str]) -> list[str]:
        """The forward body except the final `return`, whose emitted value comes back as the last line."""
        assert block.forward is not None
        subs = {s.name: s for s in block.submodules}
        lines: list[str] = []
        for stmt in block.forward.body:
            lines += [f"# {text}" for text in self.comments.take(stmt.pos)]
            lines.extend(self._cache_update(stmt.value, emit, context_names))
            if isinstance(stmt, ir.Return):
                lines.append(emit(stmt.value))
                continue
            value = stmt.value
            if isinstance(value, ir.Call) and value.func in subs and subs[value.func].kind == "repeat":
                target, source = stmt.targets[0], emit(value.args[0])
                if source != target:
                    lines.append(f"{target} = {source}")
                ctx = [context_names[c] for c in CONTEXT if c in self.needs(subs[value.func].target)]
                lines.append(f"for layer in self.{value.func}:")
                lines.append(f"{INDENT}{target} = layer({', '.join([target, *ctx])})")
                continue
            comment = _shape_comment(value)
            lines.append(f"{', '.join(stmt.targets)} = {emit(value)}{comment}")
        return lines

    def _cache_update(self, expr: ir.Expr, emit: ExprEmitter, context_names: dict[str, str]) -> list[str]:
        lines: list[str] = []
        for call in _calls_in(expr):
            if call.func != "attend" or not _may_be_causal(call) or "cache" not in context_names:
                continue
            k, v = call.args[1], call.args[2]
            if not (isinstance(k, ir.Name) and isinstance(v, ir.Name)):
                raise SpecError(
                    "name the keys and values given to `attend` (`k = ...`) so they can be cached", call.pos
                )
            cache = context_names["cache"]
            lines.append(f"if {cache} is not None:")
            lines.append(f"{INDENT}{k.id}, {v.id} = {cache}.update(self.layer_idx, {k.id}, {v.id})")
        return lines

    # ---- classes ---------------------------------------------------------------------------------
    def docstring(self, block: ir.Block) -> str:
        """The comment above a block's declaration, as a docstring (quotes and backslashes defused)."""
        comment = self.comments.take(block.pos, above_only=True)
        return _docstring(comment, INDENT) if comment else ""

    def forward_comments(self, block: ir.Block) -> list[str]:
        assert block.forward is not None
        return self.comments.take(block.forward.pos, above_only=True)

    def plan_block(self, block: ir.Block) -> ClassView:
        doc, comments = self.docstring(block), self.forward_comments(block)
        needs = self.needs(block.name)
        context_names = {c: c for c in needs}
        emit = self.forward_emitter(block, context_names)
        assert block.forward is not None
        params = [f"{p}: torch.Tensor" for p in block.forward.params]
        for c in CONTEXT:
            if c in needs:
                params.append(_CONTEXT_PARAMS[c])
                self.use(
                    "rope" if c == "rope" else "attention" if c == "mask" else "cache", _CONTEXT_TYPES[c]
                )
        body = self.statements(block, emit, context_names)
        body[-1] = f"return {body[-1]}"
        forward = _method("forward", params, "torch.Tensor", body, comments)
        takes_idx = self.takes_layer_idx(block.name)
        return ClassView(
            name=self.class_name(block.name),
            base="nn.Module",
            doc=doc,
            init_signature=f"self, config: {self.config_class}" + (", layer_idx: int" if takes_idx else ""),
            init_lines=["super().__init__()", *self.init_lines(block)],
            forward_lines=forward,
        )

    def backbone_inputs(self) -> list[tuple[str, str, str | None]]:
        """(name, annotation, default) of the backbone's inputs, shared by every head's signature."""
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

    def plan_backbone(self) -> ClassView:
        block = self.backbone
        doc, comments = self.docstring(block), self.forward_comments(block)
        needs = self.needs(block.name)
        context_names = {"rope": "rope", "mask": "mask", "cache": "past_key_values"}
        emit = self.forward_emitter(block, context_names)
        inputs = self.backbone_inputs()
        names = {n for n, _, _ in inputs}
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
            past = ", past" if "cache" in needs else ""
            body.append(f"mask = AttentionMask(attention_mask, input_ids.shape[1]{past})")
        if "position_ids" in names:
            body += [
                "if position_ids is None:",
                f"{INDENT}position_ids = mask.position_ids(input_ids.device)",
            ]
        if "rope" in needs:
            rotary = next(s.name for s in block.submodules if s.kind == "primitive" and s.target == "Rotary")
            body.append(f"rope = self.{rotary}(position_ids)")
        statements = self.statements(block, emit, context_names)
        result = statements.pop()
        body += statements
        cache = ", past_key_values=past_key_values" if "cache" in needs else ""
        body.append(f"return BaseModelOutput(last_hidden_state={result}{cache})")
        params = [f"{n}: {a}" + (f" = {d}" if d is not None else "") for n, a, d in inputs]
        return ClassView(
            name=self.class_name(block.name),
            base=self.pretrained_base,
            doc=doc,
            init_signature=f"self, config: {self.config_class}",
            init_lines=["super().__init__(config)", *self.init_lines(block), "self.post_init()"],
            forward_lines=_method("forward", params, "BaseModelOutput", body, comments),
        )

    def plan_head(self, head: ir.Block) -> ClassView:
        assert head.forward is not None and self.backbone.attr is not None
        doc, comments = self.docstring(head), self.forward_comments(head)
        attr = self.backbone.attr
        emit = self.forward_emitter(head, {})
        inputs = self.backbone_inputs()
        call_args = [inputs[0][0]] + [f"{n}={n}" for n, _, _ in inputs[1:]]
        hidden = head.forward.params[0]
        body = [f"out = self.{attr}({', '.join(call_args)})"]
        cache = (
            ", past_key_values=out.past_key_values"
            if any(n == "past_key_values" for n, _, _ in inputs)
            else ""
        )
        params = [f"{n}: {a}" + (f" = {d}" if d is not None else "") for n, a, d in inputs]
        params.append("labels: torch.Tensor | None = None")
        if head.task == "causal_lm":
            self.use("losses", "causal_lm_loss", "keep_last")
            self.use("outputs", "CausalLMOutput")
            params.append("logits_to_keep: int | torch.Tensor = 0")
            body.append(f"{hidden} = keep_last(out.last_hidden_state, logits_to_keep)")
            loss = "causal_lm_loss(logits, labels)"
            output = "CausalLMOutput"
        elif head.task == "sequence_classification":
            self.use("losses", "sequence_classification_loss")
            self.use("outputs", "SequenceClassifierOutput")
            body.append(f"{hidden} = out.last_hidden_state")
            loss = "sequence_classification_loss(logits, labels, self.config.num_labels, self.config.problem_type)"
            output = "SequenceClassifierOutput"
        else:  # pragma: no cover - the validator rejects unknown tasks
            raise SpecError(f"unknown task `{head.task}`", head.pos)
        statements = self.statements(head, emit, {})
        result = statements.pop()
        body += statements
        body.append(f"logits = {result}")
        body += ["loss = None", "if labels is not None:", f"{INDENT}loss = {loss}"]
        body.append(f"return {output}(logits=logits, loss=loss{cache})")
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
        init = [
            "super().__init__(config)",
            f"self.{attr} = {self.class_name(self.backbone.name)}(config)",
            *self.init_lines(head),
            "self.post_init()",
        ]
        return ClassView(
            name=self.class_name(head.name),
            base=self.pretrained_base,
            doc=doc,
            init_signature=f"self, config: {self.config_class}",
            init_lines=init,
            forward_lines=_method("forward", params, output, body, comments),
            methods=methods,
        )

    def _tied_weights(self, head: ir.Block) -> list[str]:
        emit = self.config_name("self.config")
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
        config = self.plan_config()
        classes: list[ClassView] = []
        for name in self._block_order():
            classes.append(self.plan_block(self.blocks[name]))
        classes.append(self.plan_backbone())
        for head in self.model.heads:
            classes.append(self.plan_head(head))
        pretrained = ClassView(
            name=self.pretrained_base,
            base="PreTrainedModel",
            doc="",
            init_signature="",
            init_lines=[],
            forward_lines=[],
            attributes=[f"config_class = {self.config_class}", f'base_model_prefix = "{self.backbone.attr}"'],
        )
        self.use("modeling", "PreTrainedModel")
        classes.insert(len(classes) - 1 - len(self.model.heads), pretrained)
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

    def _block_order(self) -> list[str]:
        """Plain blocks, children before the blocks that contain them, otherwise in spec order."""
        order: list[str] = []

        def visit(name: str) -> None:
            if name in order:
                return
            for sub in self.blocks[name].submodules:
                if sub.kind != "primitive":
                    visit(sub.target)
            if self.blocks[name].role == "block":
                order.append(name)

        for block in self.model.blocks:
            if block.role == "block" and self._reachable(block.name):
                visit(block.name)
        return order

    def _reachable(self, name: str) -> bool:
        """Blocks no backbone or head uses are not emitted (a delta may orphan its parent's blocks)."""
        seen: set[str] = set()
        stack = [b.name for b in self.model.blocks if b.role != "block"]
        while stack:
            current = stack.pop()
            for sub in self.blocks[current].submodules:
                if sub.kind != "primitive" and sub.target not in seen:
                    seen.add(sub.target)
                    stack.append(sub.target)
        return name in seen

    def _imports(self, classes: list[ClassView]) -> list[str]:
        """Import lines in the order ruff's isort wants: plain imports, then `from` imports by module."""
        method_lines = [line for c in classes for method in c.methods for line in method]
        text = "\n".join(line for c in classes for line in [*c.init_lines, *c.forward_lines]) + "\n".join(
            method_lines
        )
        lines = ["import torch"]
        if "F." in text:
            lines.append("import torch.nn.functional as F")
        lines += ["from torch import nn", ""]
        for module in sorted(self.runtime):
            lines.append(f"from specformer.runtime.{module} import {', '.join(_isort(self.runtime[module]))}")
        return lines


_CONTEXT_TYPES = {"rope": "Rope", "mask": "AttentionMask", "cache": "Cache"}


def _isort(names: set[str]) -> list[str]:
    """isort's order inside one `from` import: CONSTANTS, then Classes, then functions."""
    return sorted(names, key=lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n))


def _method(
    name: str, params: list[str], returns: str, body: list[str], comments: list[str] = ()
) -> list[str]:
    head = [f"{INDENT}# {text}" for text in comments]
    head += call_lines(INDENT, f"def {name}(", ["self", *params], f") -> {returns}:")
    if len(head) > len(comments) + 1 and not head[-2].endswith(","):
        # ruff puts each parameter on its own line once a signature is split
        head = [
            *head[: len(comments) + 1],
            *(f"{INDENT * 2}{p}," for p in ["self", *params]),
            f"{INDENT}) -> {returns}:",
        ]
    lines = list(head)
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


def _atom(text: str) -> str:
    """Parenthesise `text` unless it is safe to follow with `.attr` or `[...]`."""
    depth = 0
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and ch in " -+*/%<>=!":
            return f"({text})"
    return text


def _calls_in(expr: ir.Expr) -> list[ir.Call]:
    return [n for n in walk(expr) if isinstance(n, ir.Call)]


def _may_be_causal(call: ir.Call) -> bool:
    causal = call.kwarg("causal")
    return causal is not None and not (isinstance(causal, ir.Const) and causal.value is False)


def _shape_comment(expr: ir.Expr) -> str:
    if isinstance(expr, ir.Call) and expr.func == "split_heads":
        return "  # (B, H, T, D)"
    return ""


def plan(model: ir.ResolvedModel) -> ModelView:
    return Planner(model).plan()


def _is_literal(f: ir.ConfigField) -> bool:
    """A default that needs no other field: a constant, or an activation/enum spelled as a bare name."""
    if isinstance(f.default, ir.Name):
        return f.type.name in ("activation", "enum")
    return f.default is not None and not list(names_in(f.default))
