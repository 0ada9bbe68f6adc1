"""What every planner shares about one model: its IR and facts, class names, comments, and the spelling
of config expressions and forward calls."""

from __future__ import annotations

from specformer.dsl import ir
from specformer.dsl.analysis import CONTEXT, Facts
from specformer.dsl.comments import CommentIndex
from specformer.dsl.errors import SpecError
from specformer.dsl.library import ACTIVATIONS, BUILTINS, Builtin

from .code import Param
from .config_plan import is_literal, literal_source
from .expressions import ExprEmitter
from .spelling import fill


class ModelContext:
    def __init__(self, model: ir.ResolvedModel) -> None:
        assert isinstance(model.facts, Facts), "plan a model from SpecSet.resolved(), which analyses it"
        self.model = model
        self.facts: Facts = model.facts
        self.fields = {f.name: f for f in model.config.fields}
        self.blocks = {b.name: b for b in model.blocks}
        self.config_class = f"{model.name}Config"
        self.pretrained_base = f"{model.name}PreTrainedModel"
        backbone = model.backbone
        assert backbone.attr is not None
        self.backbone = backbone
        self.comments = CommentIndex(model.comments)
        # `let`s the generated code reads as config attributes: only these become config properties
        self.read_lets: set[str] = set()

    def class_name(self, block_name: str) -> str:
        return f"{self.model.name}{block_name}"

    def holds_inputs(self, sub: ir.Submodule) -> bool:
        """A held block that reads the model's inputs (the backbone, or a block holding it)."""
        return sub.kind == "block" and self.facts.takes_inputs(sub.target)

    def returns(self, block: ir.Block) -> str:
        count = self.facts.returns[block.name]
        return "torch.Tensor" if count == 1 else f"tuple[{', '.join(['torch.Tensor'] * count)}]"

    def model_inputs(self) -> list[Param]:
        """The model's inputs, shared by the backbone and every class that reads them."""
        needs = self.facts.needs[self.backbone.name]
        assert self.backbone.forward is not None
        declared = self.backbone.forward.params
        inputs = [Param("input_ids", "torch.Tensor"), Param("attention_mask", "torch.Tensor | None", "None")]
        for name in ("token_type_ids", "position_ids"):
            if name in declared or (name == "position_ids" and "rope" in needs):
                inputs.append(Param(name, "torch.Tensor | None", "None"))
        if "cache" in needs:
            inputs.append(Param("past_key_values", "Cache | None", "None"))
            inputs.append(Param("use_cache", "bool", "False"))
        return inputs

    # ---- comments ----------------------------------------------------------------------------------
    def docstring(self, block: ir.Block) -> str:
        comment = self.comments.take(block.pos, above_only=True)
        return docstring(comment, "    ") if comment else ""

    def forward_comments(self, block: ir.Block) -> tuple[str, ...]:
        assert block.forward is not None
        return tuple(self.comments.take(block.forward.pos, above_only=True))

    # ---- spelling ------------------------------------------------------------------------------------
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
                self.read_lets.add(id_)
            return f"{owner}.{id_}"

        def call(node: ir.Call) -> str:
            raise SpecError("calls are not allowed in a config expression", node.pos)

        emitter = ExprEmitter(name, call)
        return emitter

    def forward_expr(self, block: ir.Block, context_names: dict[str, str]) -> ExprEmitter:
        """Spells a forward's expressions: locals as themselves, config values through `config_expr`,
        submodule calls with the context their block needs, builtins and activations from the library."""
        assert block.forward is not None
        subs = {s.name: s for s in block.submodules}
        locals_ = block.forward.local_names()
        options = frozenset(o.name for o in block.options)
        per_layer = frozenset(self.facts.per_layer_values[block.name])
        scalar = self.config_expr("self.config", per_layer, options)

        def name(id_: str) -> str:
            return id_ if id_ in locals_ else scalar.name(id_)

        emitter = ExprEmitter(name, lambda c: "")

        def call(node: ir.Call) -> str:
            args = [emitter(a) for a in node.args]
            sub = subs.get(node.func)
            if sub is not None:
                if self.holds_inputs(sub):
                    raise SpecError(
                        f"`{node.func}` reads the model inputs: call it in its own statement", node.pos
                    )
                if sub.kind == "block":
                    args += [context_names[c] for c in CONTEXT if c in self.facts.needs[sub.target]]
                return f"self.{node.func}({', '.join(args)})"
            builtin = BUILTINS.get(node.func)
            if builtin is not None:
                return _builtin(builtin, node, emitter, context_names)
            if node.func in self.fields:  # an activation chosen by the config
                return f"self.{node.func}_fn({args[0]})"
            return fill(ACTIVATIONS[node.func].spelling, {"x": args[0]}, {"x"}, {})

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


def _builtin(builtin: Builtin, node: ir.Call, emit: ExprEmitter, context_names: dict[str, str]) -> str:
    signature = builtin.signature
    given = dict(zip(signature.names, node.args, strict=False)) | dict(node.kwargs)
    args = {p.name: emit(given[p.name]) if p.name in given else repr(p.default) for p in signature.params}
    head_inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    return fill(builtin.spelling, args, set(given), {**context_names, **head_inputs})


def docstring(lines: list[str], indent: str) -> str:
    """Comment lines as a docstring, quotes included. Quotes and backslashes in the text are replaced so
    nothing in a comment can end or escape the string."""
    safe = [line.replace("\\", "/").replace('"', "'") for line in lines]
    if len(safe) == 1:
        return f'"""{safe[0]}"""'
    body = "\n".join(f"{indent}{line}" if i else line for i, line in enumerate(safe))
    return f'"""{body}\n{indent}"""'
