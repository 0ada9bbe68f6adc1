"""Every decision about the generated code, made in Python on the analysed IR: `plan(model)` returns the
package as data (`codegen.code`), which `codegen.emit` turns into source.

Three kinds of class come out of a spec's blocks (`codegen.blocks`):
- plain blocks, `forward(x, <context>)`, where the context is what their dataflow needs (rope, mask, cache);
- input blocks: the backbone (here), and any block or head that holds it (DPR's encoders); they take the
  model's inputs (`input_ids`, `attention_mask`, ...) and pass them on;
- heads over the backbone (`codegen.heads`), which call it and turn its output into the task's outputs.
"""

from __future__ import annotations

import re

from specformer.dsl import ir
from specformer.dsl.library import TASKS

from .blocks import BlockPlanner
from .code import Attribute, Class, Function, Line, ModulePlan, Nested, Param, Stmt
from .config_plan import literal_source, plan_config, python_type
from .context import ModelContext, docstring
from .decoder_match import DecoderMatch, match_decoder
from .emit import isort_order
from .heads import HeadPlanner, plain_projection, tp_plan


def package_name(model: ir.ResolvedModel) -> str:
    """The package is named after the model_type, as Hugging Face's modules are (`gpt_neox`)."""
    return model.type_name


def plan(model: ir.ResolvedModel) -> ModulePlan:
    ctx = ModelContext(model)
    blocks, heads = BlockPlanner(ctx), HeadPlanner(ctx, BlockPlanner(ctx))
    model_comment = ctx.comments.take(model.pos, above_only=True)
    doc = docstring(model_comment or [f"{model.name}, generated from its spec."], "")
    base_plan = tp_plan(ctx, ctx.backbone)
    feature_attributes, feature_methods = _features_member(attention_features(ctx))
    gguf_attributes, gguf_methods = _gguf_members(ctx)
    pretrained = Class(
        ctx.pretrained_base,
        "PreTrainedModel",
        attributes=(
            Attribute("config_class", None, ctx.config_class),
            Attribute("base_model_prefix", None, f'"{ctx.backbone.attr}"'),
            *(
                [
                    Attribute(
                        "base_model_tp_plan", "ClassVar[dict[str, str]]", entries=tuple(base_plan.items())
                    )
                ]
                if base_plan
                else []
            ),
            *feature_attributes,
            *gguf_attributes,
            *_stored_names_member(ctx),
        ),
        methods=(*feature_methods, *gguf_methods),
    )
    order = [
        n for n in ctx.facts.children_first if ctx.blocks[n].role == "block" and n in ctx.facts.reachable
    ]
    plain = [blocks.plain_block(ctx.blocks[n]) for n in order if not ctx.facts.takes_inputs(n)]
    backbone = _backbone(ctx, blocks)
    holders = [blocks.input_block(ctx.blocks[n]) for n in order if ctx.facts.takes_inputs(n)]
    head_classes = [heads.head(h) for h in model.heads]
    classes = [*plain, pretrained, backbone, *holders, *head_classes]
    registrations = decoder_registrations(ctx)
    # last: the config keeps a `let` as a property only where the code above reads it
    order, lets = list(ctx.facts.field_order), ctx.facts.layer_lets
    config = plan_config(model, order, lets, ctx.config_expr("self"), ctx.read_lets)
    return ModulePlan(
        package=package_name(model),
        doc=doc,
        config=config,
        classes=classes,
        exports=[config.name, *isort_order({c.name for c in classes if c.base != "nn.Module"})],
        registrations=registrations,
    )


def _backbone(ctx: ModelContext, blocks: BlockPlanner) -> Class:
    """The backbone: model inputs in, a `BaseModelOutput` out; it builds the mask, positions and cache
    its layers need, once."""
    block = ctx.backbone
    doc, forward_comments = ctx.docstring(block), ctx.forward_comments(block)
    needs = ctx.facts.needs[block.name]
    context_names = {"rope": "rope", "mask": "mask", "cache": "past_key_values"}
    emit = ctx.forward_expr(block, context_names)
    inputs = ctx.model_inputs()
    names = {p.name for p in inputs}
    body: list[Stmt] = []
    if "cache" in needs:
        body += [
            Nested("if use_cache and past_key_values is None:", (Line("past_key_values = DynamicCache()"),)),
            Line("past = past_key_values.get_seq_length() if past_key_values is not None else 0"),
        ]
    if needs & {"mask", "rope"} or "position_ids" in names:
        past = ", past, past_key_values" if "cache" in needs else ""
        backend = ", backend=self.attn_implementation" if "mask" in needs else ""
        body.append(Line(f"mask = AttentionMask(attention_mask, input_ids.shape[1]{past}{backend})"))
    if "position_ids" in names:
        body.append(
            Nested("if position_ids is None:", (Line("position_ids = mask.position_ids(input_ids.device)"),))
        )
    if "token_type_ids" in names:
        body.append(
            Nested("if token_type_ids is None:", (Line("token_type_ids = torch.zeros_like(input_ids)"),))
        )
    if "rope" in needs:
        rotary = next(s.name for s in block.submodules if s.kind == "primitive" and s.target == "Rotary")
        body.append(Line(f"rope = self.{rotary}(position_ids)"))
    statements, values = blocks.statements(block, emit, context_names)
    body += statements
    outputs = [f"{n}={v}" for n, v in zip(["last_hidden_state", "pooler_output"], values, strict=False)]
    if "cache" in needs:
        outputs.append("past_key_values=past_key_values")
    body.append(Line(f"return BaseModelOutput({', '.join(outputs)})"))
    options = [Param(o.name, python_type(o), literal_source(o)) for o in block.options]
    init_body = (Line("super().__init__(config)"), *blocks.init_body(block), Line("self.post_init()"))
    init = Function("__init__", (Param("config", ctx.config_class), *options), "None", init_body)
    forward = Function("forward", tuple(inputs), "BaseModelOutput", tuple(body), forward_comments)
    return Class(ctx.class_name(block.name), ctx.pretrained_base, doc, (), (init, forward))


def attention_features(ctx: ModelContext) -> dict[str, list[str] | None]:
    """What the model's `attend` calls ask of the backend beyond masking (`softcap`): feature -> the config
    fields whose value decides it (when each `attend` passes a plain config field), or None (always)."""
    calls = [c for n in ctx.facts.reachable if ctx.blocks[n].forward for c in ctx.blocks[n].forward.calls()]
    found: dict[str, list[str] | None] = {}
    for call in (c for c in calls if c.func == "attend"):
        for key, value in call.kwargs:
            feature = ATTEND_FEATURES.get(key)
            if feature is None or _is_none(value):
                continue
            field = ctx.fields.get(value.id) if isinstance(value, ir.Name) else None
            if field is None or field.computed or found.get(feature, []) is None:
                found[feature] = None  # a tensor, literal or computed value: needed whatever the config says
            else:
                found[feature] = sorted({*found.get(feature, []), value.id})
    return found


# `attend` keywords that ask a backend for more than masking -> the feature's name in the runtime
ATTEND_FEATURES = {"softcap": "softcap", "bias": "score_bias"}


def _features_member(features: dict[str, list[str] | None]) -> tuple[list[Attribute], list[Function]]:
    """`attention_features`: a class attribute when fixed, else a property reading the config."""
    if not features:
        return [], []
    fixed = sorted(f for f, fields in features.items() if fields is None)
    if len(fixed) == len(features):
        value = "frozenset({" + ", ".join(f'"{f}"' for f in fixed) + "})"
        return [Attribute("attention_features", "ClassVar[frozenset[str]]", value)], []
    parts = [f'frozenset({{"{f}"}})' for f in fixed]
    for feature, fields in sorted(features.items()):
        if fields is not None:
            test = " or ".join(f"self.config.{n} is not None" for n in fields)
            parts.append(f'(frozenset({{"{feature}"}}) if {test} else frozenset())')
    expression = " | ".join(parts) if len(parts) > 1 else parts[0].removeprefix("(").removesuffix(")")
    method = Function(
        "attention_features", (), "frozenset[str]", (Line(f"return {expression}"),),
        ("what this config asks of the attention backend beyond masking",), ("@property",),
    )  # fmt: skip
    return [], [method]


def _stored_names_member(ctx: ModelContext) -> list[Attribute]:
    """`stored_names`: key prefixes older checkpoints use under the backbone -> the model's own."""
    entries = []
    for stored in ctx.model.stored_names:
        for path in block_paths(ctx, ctx.backbone, stored.block):
            entries.append((f"{path}{stored.stored}.", f"{path}{stored.name}."))
    if not entries:
        return []
    return [Attribute("stored_names", "ClassVar[dict[str, str]]", entries=tuple(entries))]


def _gguf_members(ctx: ModelContext) -> tuple[list[Attribute], list[Function]]:
    """`gguf_architecture`, and `gguf_row_orders()` when llama.cpp's converter reorders some rows: module
    path patterns under the backbone -> (the rows' shape in the file, the axes that give ours)."""
    layout = ctx.model.gguf
    if layout is None:
        return [], []
    attributes = [Attribute("gguf_architecture", "ClassVar[str]", f'"{layout.architecture}"')]
    if not layout.rows:
        return attributes, []
    emit = ctx.config_expr("self.config")
    body: list[Stmt] = [Line("orders = {}")]
    for rows in layout.rows:
        shape = ", ".join(emit(e) for e in rows.shape)
        order = ", ".join(str(axis) for axis in rows.order)
        body += [Line(f"# {text}") for text in ctx.comments.take(rows.pos)]
        for block, sub in rows.targets:
            for path in block_paths(ctx, ctx.backbone, block):
                body.append(Line(f'orders["{path}{sub}"] = (({shape}), ({order}))'))
    body.append(Line("return orders"))
    comment = ctx.comments.take(layout.pos)
    method = Function(
        "gguf_row_orders", (), "dict[str, tuple[tuple[int, ...], tuple[int, ...]]]", tuple(body),
        tuple(comment) or ("rows llama.cpp's converter stores in another order: (their shape there, our axes)",),
    )  # fmt: skip
    return attributes, [method]


def block_paths(ctx: ModelContext, block: ir.Block, target: str, prefix: str = "") -> list[str]:
    """Where instances of block `target` sit under `block`: `layers.*.self_attn.`."""
    paths = []
    for sub in (c for s in block.submodules for c in s.choices()):
        if sub.kind not in ("block", "repeat"):
            continue
        path = f"{prefix}{sub.name}." + ("*." if sub.kind == "repeat" else "")
        if sub.target == target:
            paths.append(path)
        paths += block_paths(ctx, ctx.blocks[sub.target], target, path)
    return paths


def _is_none(expr: ir.Expr) -> bool:
    return isinstance(expr, ir.Const) and expr.value is None


def _mlp_paths(found: DecoderMatch) -> dict[str, str]:
    """The fused step's MLP modules, from a layer: a gated MLP's projections and activation, or a
    mixture's router and experts (whose activation is their own `act_fn`)."""
    if found.experts is not None:
        experts = f"{found.mlp}.{found.experts}"
        return {"router": f"{found.mlp}.{found.router}", "experts": experts, "act": f"{experts}.act_fn"}
    projections = {k: f"{found.mlp}.{getattr(found, f'{k}_proj')}" for k in ("gate", "up", "down")}
    return {**projections, "act": f"{found.mlp}.{found.act}_fn"}


def decoder_registrations(ctx: ModelContext) -> list[str]:
    """`register_decoder(...)` calls for causal LMs whose spec is exactly the fused decode step's
    dataflow (`decoder_match`), naming where their modules are; nothing for any other model."""
    activations = {n for n, f in ctx.fields.items() if f.type.name == "activation"}
    found = match_decoder(ctx.model, activations)
    if found is None:
        return []
    window = None
    if found.window is not None:  # as the attention block's forward reads it: an attribute of the block
        spelled = ctx.forward_expr(ctx.blocks[found.attention_block], {})(found.window)
        if spelled != "None":
            if not re.fullmatch(r"self\.[\w.]+", spelled):
                return []
            window = f"{found.attn}.{spelled.removeprefix('self.')}"
    head_dim = ctx.config_expr("config")(found.head_dim)
    if not re.fullmatch(r"config\.\w+", head_dim):
        return []
    calls = []
    for head in ctx.model.heads:
        projection = plain_projection(head) if TASKS[head.task or ""].generates else None
        if projection is None or ctx.facts.takes_inputs(head.name):
            continue
        paths = {
            "backbone": head.attr or ctx.backbone.attr,
            "embed": found.embed,
            "layers": found.layers,
            "norm": found.norm,
            "rotary": found.rotary,
            "head": projection[0],
            "head_dim": head_dim.removeprefix("config."),
            "input_norm": found.input_norm,
            **{k: f"{found.attn}.{getattr(found, f'{k}_proj')}" for k in ("q", "k", "v", "o")},
            "post_norm": found.post_norm,
            **_mlp_paths(found),
        }
        if window is not None:
            paths["window"] = window
        fields = ", ".join(f'{k}="{v}"' for k, v in paths.items())
        calls.append(f"register_decoder({ctx.class_name(head.name)}, DecoderPaths({fields}))")
    return calls
