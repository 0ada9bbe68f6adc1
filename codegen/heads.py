"""Task heads -> classes: the backbone call, the spec's head forward, and what the task adds around it
(labels and loss, the output type, positions kept for generation, choices flattened to rows)."""

from __future__ import annotations

from specformer.dsl import ir
from specformer.dsl.ir import names_in
from specformer.dsl.library import TASKS

from .blocks import BlockPlanner
from .code import Attribute, Class, Function, Line, Nested, Param, Stmt
from .context import ModelContext
from .spelling import atom

_CHOICE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


class HeadPlanner:
    def __init__(self, ctx: ModelContext, blocks: BlockPlanner) -> None:
        self.ctx = ctx
        self.blocks = blocks

    def head(self, head: ir.Block) -> Class:
        ctx = self.ctx
        assert head.forward is not None and head.task is not None
        doc, forward_comments = ctx.docstring(head), ctx.forward_comments(head)
        task = TASKS[head.task]
        emit = ctx.forward_expr(head, {})
        inputs = ctx.model_inputs()
        names = [p.name for p in inputs]
        labels = [*task.labels, *(label for _, label, _ in task.more_losses)]
        params = [*inputs, *(Param(label, "torch.Tensor | None", "None") for label in labels)]
        body: list[Stmt] = []
        init: list[Stmt] = [Line("super().__init__(config)")]
        attributes: list[Attribute] = []
        explicit = ctx.facts.takes_inputs(head.name)  # the head holds the backbone itself, where it chose
        if task.choices:
            # (batch, choices, length) inputs become (batch * choices, length) rows
            body.append(Line("num_choices = input_ids.shape[1]"))
            for n in (n for n in names if n in _CHOICE_INPUTS):
                flat = (
                    f"{n}.flatten(0, 1)"
                    if n == "input_ids"
                    else f"{n}.flatten(0, 1) if {n} is not None else None"
                )
                body.append(Line(f"{n} = {flat}"))
        if not explicit:
            attr = head.attr or ctx.backbone.attr
            assert attr is not None
            if attr != ctx.backbone.attr:
                attributes.append(Attribute("base_model_prefix", None, f'"{attr}"'))
            expr = ctx.config_expr("config")
            args = ["config", *(f"{k}={expr(v)}" for k, v in head.backbone_args)]
            init.append(Line(f"self.{attr} = {ctx.class_name(ctx.backbone.name)}({', '.join(args)})"))
            body.append(Line(f"out = self.{attr}({', '.join([names[0], *(f'{n}={n}' for n in names[1:])])})"))
            params += [Param(name, annotation, default) for name, annotation, default in task.inputs]
            sources = [task.hidden, task.second]
            read = {n.id for e in head.forward.expressions() for n in names_in(e)}
            bound = [(p, s) for p, s in zip(head.forward.params, sources, strict=False) if p in read]
            if bound:
                body.append(Line(f"{', '.join(p for p, _ in bound)} = {', '.join(s for _, s in bound)}"))
        else:
            holder = next(s.name for s in head.submodules if ctx.holds_inputs(s))
            attributes.append(Attribute("base_model_prefix", None, f'"{holder}"'))
        statements, values = self.blocks.statements(head, emit, {})
        body += statements
        result = ", ".join(values)
        projection = plain_projection(head) if task.generates else None
        if projection is not None:
            past = ", past_key_values=out.past_key_values" if "past_key_values" in names else ""
            fused = (
                Line("# Training needs only the loss: fused with the head's matmul, chunk by chunk, the"),
                Line("# (tokens x vocab) logits are never built whole (outputs carry no logits here)."),
                Line(
                    f"loss = linear_cross_entropy({projection[1]}, self.{projection[0]}, labels, num_items_in_batch)"
                ),
                Line(f"return {task.output}(loss=loss{past})"),
            )
            body.append(Nested("if labels is not None and self.training:", fused))
        outputs = task.outputs
        if task.loss is None and len(outputs) == 1 and result.isidentifier():
            outputs = (f"{outputs[0]}={result}",)  # hand the named value straight to the output
        else:
            body.append(Line(f"{', '.join(outputs)} = {result}"))
        if task.choices:
            body += [Line(line) for line in task.reshape]
        fields = [o if "=" in o else f"{o}={o}" for o in outputs]
        if task.loss is not None:
            present = " and ".join(f"{label} is not None" for label in task.labels)
            body += [Line("loss = None"), Nested(f"if {present}:", (Line(f"loss = {task.loss}"),))]
            fields.append("loss=loss")
        for field, label, expression in task.more_losses:
            body += [
                Line(f"{field} = None"),
                Nested(f"if {label} is not None:", (Line(f"{field} = {expression}"),)),
            ]
            fields.append(f"{field}={field}")
        if not explicit and "past_key_values" in names:
            fields.append("past_key_values=out.past_key_values")
        body.append(Line(f"return {task.output}({', '.join(fields)})"))
        methods = [
            Function(
                "__init__",
                (Param("config", ctx.config_class),),
                "None",
                (*init, *self.blocks.init_body(head), Line("self.post_init()")),
            ),
            Function("forward", tuple(params), task.output, tuple(body), forward_comments),
        ]
        if head.ties:
            methods.append(self._tied_weights(head))
        if task.generates:
            methods.append(
                Function(
                    "generation_defaults",
                    (),
                    "dict[str, Any]",
                    (Line("return generation_defaults(self.config)"),),
                )
            )
        plan = tp_plan(ctx, head)
        if plan:
            attributes.append(Attribute("tp_plan", "ClassVar[dict[str, str]]", entries=tuple(plan.items())))
        return Class(ctx.class_name(head.name), ctx.pretrained_base, doc, tuple(attributes), tuple(methods))

    def _tied_weights(self, head: ir.Block) -> Function:
        emit = self.ctx.config_expr("self.config")
        pairs = [(f'"{t.name}.weight"', f'"{".".join(t.target)}.weight"', t.condition) for t in head.ties]
        body: list[Stmt]
        if len(pairs) == 1 and pairs[0][2] is not None:
            key, value, condition = pairs[0]
            assert condition is not None
            body = [
                Nested(f"if not {atom(emit(condition))}:", (Line("return {}"),)),
                Line(f"return {{{key}: {value}}}"),
            ]
        else:
            body = [Line("ties: dict[str, str] = {}")]
            for key, value, condition in pairs:
                if condition is None:
                    body.append(Line(f"ties[{key}] = {value}"))
                else:
                    body.append(Nested(f"if {emit(condition)}:", (Line(f"ties[{key}] = {value}"),)))
            body.append(Line("return ties"))
        return Function("tied_weights", (), "dict[str, str]", tuple(body))


def plain_projection(head: ir.Block) -> tuple[str, str] | None:
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
    sub = head.submodule(value.func)
    if sub is None or sub.kind != "primitive" or sub.target != "Linear" or sub.condition is not None:
        return None
    if not (isinstance(arg, ir.Name) and arg.id in head.forward.params):
        return None
    return sub.name, arg.id


def tp_plan(ctx: ModelContext, block: ir.Block, prefix: str = "") -> dict[str, str]:
    """Module path patterns (`layers.*.self_attn.q_proj`) -> parallel style, from `parallel` lines."""
    plan = {f"{prefix}{name}": entry.style for entry in block.parallel for name in entry.names}
    for sub in (c for s in block.submodules for c in s.choices()):
        if sub.kind == "block":
            plan |= tp_plan(ctx, ctx.blocks[sub.target], f"{prefix}{sub.name}.")
        elif sub.kind == "repeat":
            plan |= tp_plan(ctx, ctx.blocks[sub.target], f"{prefix}{sub.name}.*.")
    return plan
