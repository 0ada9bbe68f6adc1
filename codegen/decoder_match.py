"""Recognise a spec whose decoder the fused CPU decode step can run (runtime/fused_decode.py).

The kernel hard-codes one dataflow: a pre-norm decoder layer (`x = x + attn(norm(x))`, then
`x + mlp(norm(x))`), attention with q/k/v/o projections, full rotary, `attend` (optionally windowed) and a
gated MLP `down(act(gate(x)) * up(x))`, under a backbone `norm(layers(embed(input_ids)))` and a head `lm_head(h)`. A spec matches when its forwards
are exactly these statements (any names), so the planner can hand the runtime the modules in the kernel's
order; anything else (post-norm, q/k norms, an attention
scale or soft-cap...) simply gets no layout and decodes op by op. What the IR leaves to the config (the
activation, the norms' offset and eps) the runtime checks before it takes the kernel.

Forwards are compared as text in a canonical spelling of the IR (`_spell`), against patterns whose
`{name}` slots bind identifiers: the first use of a slot captures, later uses must repeat the same name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from specformer.dsl import ir
from specformer.dsl.library import PRIMITIVES, REQUIRED

_DECODER_LAYER = "{x} = ({x} + {attn}({input_norm}({x}))); return ({x} + {mlp}({post_norm}({x})))"
_ATTENTION = (
    "{q} = split_heads({q_proj}({x}), {head_dim}); {k} = split_heads({k_proj}({x}), {head_dim}); "
    "{v} = split_heads({v_proj}({x}), {head_dim}); {q}, {k} = rotary({q}, {k}); "
    "{y} = attend({q}, {k}, {v}); return {o_proj}(merge_heads({y}))"
)
_MLP = "return {down_proj}(({act}({gate_proj}({x})) * {up_proj}({x})))"
_BACKBONE = "{x} = {embed}(input_ids); {x} = {layers}({x}); return {norm}({x})"
_ATTEND_OPTIONS = {"causal", "window", "dropout"}  # `scale` or anything new: not the kernel's math


@dataclass(frozen=True)
class DecoderMatch:
    """Attribute names along the path head -> backbone -> layer -> attention / MLP."""

    embed: str
    layers: str
    norm: str
    rotary: str
    input_norm: str
    attn: str
    post_norm: str
    mlp: str
    q_proj: str
    k_proj: str
    v_proj: str
    o_proj: str
    head_dim: ir.Expr  # the head size split_heads is given
    window: ir.Expr | None  # attend's window, spelled later in the attention block's own terms
    attention_block: str
    gate_proj: str
    up_proj: str
    down_proj: str
    act: str  # the activation-typed config field


def match_decoder(model: ir.ResolvedModel, activation_fields: set[str]) -> DecoderMatch | None:
    """The decoder's module names when the spec has exactly the fused step's dataflow, else None."""
    backbone = model.backbone
    found = _match(backbone, _BACKBONE)
    embed_options = {"padding_idx", "scale"}  # the embedding scales its own rows
    if found is None or not _is(backbone, found["embed"], "primitive", "Embedding", options=embed_options):
        return None
    rotaries = [s.name for s in backbone.submodules if s.kind == "primitive" and s.target == "Rotary"]
    layers = backbone.submodule(found["layers"])
    if len(rotaries) != 1 or layers is None or layers.kind != "repeat" or layers.condition is not None:
        return None
    layer_block = model.block(layers.target)
    layer = _match(layer_block, _DECODER_LAYER)
    if layer is None:
        return None
    norms = [(backbone, found["norm"]), (layer_block, layer["input_norm"]), (layer_block, layer["post_norm"])]
    if not all(
        _is(block, name, "primitive", "RMSNorm", options={"eps", "unit_offset"}) for block, name in norms
    ):
        return None  # the runtime checks that the norms share their eps and offset
    if not (_is(layer_block, layer["attn"], "block") and _is(layer_block, layer["mlp"], "block")):
        return None
    attention_block = model.block(layer_block.submodule(layer["attn"]).target)  # type: ignore[union-attr]
    attention = _match(attention_block, _ATTENTION)
    mlp_block = model.block(layer_block.submodule(layer["mlp"]).target)  # type: ignore[union-attr]
    mlp = _match(mlp_block, _MLP)
    if attention is None or mlp is None or mlp["act"] not in activation_fields:
        return None
    linears = [(attention_block, attention[n]) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    linears += [(mlp_block, mlp[n]) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(_is(block, name, "primitive", "Linear", options={"bias"}) for block, name in linears):
        return None
    attend = next(
        s.value
        for s in attention_block.forward.body
        if isinstance(s, ir.Assign) and _is_call(s.value, "attend")
    )  # type: ignore[union-attr]
    if not {k for k, _ in attend.kwargs} <= _ATTEND_OPTIONS:  # type: ignore[union-attr]
        return None
    options = dict(attend.kwargs)  # type: ignore[union-attr]
    window = options.get("window")
    return DecoderMatch(
        embed=found["embed"],
        layers=found["layers"],
        norm=found["norm"],
        rotary=rotaries[0],
        input_norm=layer["input_norm"],
        attn=layer["attn"],
        post_norm=layer["post_norm"],
        mlp=layer["mlp"],
        q_proj=attention["q_proj"],
        k_proj=attention["k_proj"],
        v_proj=attention["v_proj"],
        o_proj=attention["o_proj"],
        head_dim=attention_block.forward.body[0].value.args[1],  # type: ignore[union-attr]
        window=None if isinstance(window, ir.Const) and window.value is None else window,
        attention_block=attention_block.name,
        gate_proj=mlp["gate_proj"],
        up_proj=mlp["up_proj"],
        down_proj=mlp["down_proj"],
        act=mlp["act"],
    )


def _match(block: ir.Block | None, pattern: str) -> dict[str, str] | None:
    """The slots' bindings when the block's forward spells exactly `pattern`."""
    if block is None or block.forward is None:
        return None
    regex, seen = "", set()
    for literal, slot in re.findall(r"([^{]*)(?:\{(\w+)\})?", pattern):
        regex += re.escape(literal)
        if slot:
            regex += f"(?P={slot})" if slot in seen else rf"(?P<{slot}>\w+)"
            seen.add(slot)
    found = re.fullmatch(regex, "; ".join(_statement(s) for s in block.forward.body))
    return found.groupdict() if found else None


def _is(
    block: ir.Block, name: str, kind: str, target: str | None = None, options: set[str] = frozenset()
) -> bool:
    """`name` is an unconditional submodule of this kind (and primitive), whose optional arguments
    (positional or by keyword) are among `options`."""
    sub = block.submodule(name)
    if sub is None or sub.kind != kind or sub.condition is not None:
        return False
    if target is None:
        return True
    signature = PRIMITIVES[target].signature
    given = {*signature.names[: len(sub.args)], *(k for k, _ in sub.kwargs)}
    required = {p.name for p in signature.params if p.default is REQUIRED}
    return sub.target == target and given <= required | options


def _is_call(expr: ir.Expr, func: str) -> bool:
    return isinstance(expr, ir.Call) and expr.func == func


def _statement(stmt: ir.Stmt) -> str:
    if isinstance(stmt, ir.Return):
        return "return " + ", ".join(_spell(v) for v in stmt.values)
    return f"{', '.join(stmt.targets)} = {_spell(stmt.value)}"


def _spell(expr: ir.Expr) -> str:
    """A canonical spelling: every operation parenthesised; attend's options left to `match_decoder`."""
    if isinstance(expr, ir.Name):
        return expr.id
    if isinstance(expr, ir.Number):
        return expr.text
    if isinstance(expr, ir.BinOp):
        return f"({_spell(expr.left)} {expr.op} {_spell(expr.right)})"
    if isinstance(expr, ir.Call):
        args = [_spell(a) for a in expr.args]
        if expr.func != "attend":
            args += [f"{k}={_spell(v)}" for k, v in expr.kwargs]
        return f"{expr.func}({', '.join(args)})"
    return f"<{expr.kind}>"  # never part of a pattern
