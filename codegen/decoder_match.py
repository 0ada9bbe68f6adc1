"""Recognise a spec whose decoder the fused CPU decode step can run (runtime/fused_decode.py).

The kernel hard-codes one dataflow: a pre-norm decoder layer (`x = x + attn(norm(x))`, then
`x + mlp(norm(x))`), attention with q/k/v/o projections, full rotary, `attend` (optionally windowed) and a
gated MLP `down(act(gate(x)) * up(x))` or a mixture of such MLPs (`weights, chosen = router(x)` then
`experts(x, chosen, weights)`, a Router and an Experts primitive), under a backbone
`norm(layers(embed(input_ids)))` and a head `lm_head(h)`. A spec matches when its forwards have exactly this structure under any names: each
pattern below is parsed by the spec grammar and unified with the spec's IR, its names binding to the
spec's (the first use of a name binds it, later uses must repeat it). Anything else (post-norm, q/k norms,
an attention scale or soft-cap...) gets no fused step and decodes op by op. What the IR leaves to the
config (the activation, the norms' offset and eps) the runtime checks before it takes the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from specformer.dsl import ir
from specformer.dsl.library import BUILTINS, PRIMITIVES, REQUIRED
from specformer.dsl.parser import parse

_PATTERNS = """
model Pattern {
  block Backbone { forward(input_ids) { x = embed(input_ids)  x = layers(x)  return norm(x) } }
  block Layer { forward(x) { x = x + attn(input_norm(x))  return x + mlp(post_norm(x)) } }
  block Attention {
    forward(x) {
      q = split_heads(q_proj(x), head_dim)
      k = split_heads(k_proj(x), head_dim)
      v = split_heads(v_proj(x), head_dim)
      q, k = rotary(q, k)
      y = attend(q, k, v)
      return o_proj(merge_heads(y))
    }
  }
  block MLP { forward(x) { return down_proj(act(gate_proj(x)) * up_proj(x)) } }
  block Experts { forward(x) { weights, chosen = router(x)  return experts(x, chosen, weights) } }
}
"""
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
    window: ir.Expr | None  # attend's window, in the attention block's terms
    attention_block: str
    act: str  # the activation-typed config field
    gate_proj: str | None = None  # a gated MLP's projections,
    up_proj: str | None = None
    down_proj: str | None = None
    router: str | None = None  # or a mixture of experts' router and experts
    experts: str | None = None


@cache
def _patterns() -> dict[str, ir.Forward]:
    (model,) = parse(_PATTERNS, "<decoder patterns>")
    return {b.name: b.forward for b in model.blocks if b.forward is not None}


def match_decoder(model: ir.ResolvedModel, activation_fields: set[str]) -> DecoderMatch | None:
    """The decoder's module names when the spec has exactly the fused step's dataflow, else None."""
    backbone = model.backbone
    found = _unify_forward(backbone, "Backbone")
    embed_options = {"padding_idx", "scale"}  # the embedding scales its own rows
    if found is None or not _is(backbone, found["embed"], "primitive", "Embedding", embed_options):
        return None
    rotaries = [s.name for s in backbone.submodules if s.kind == "primitive" and s.target == "Rotary"]
    layers = backbone.submodule(found["layers"])
    if len(rotaries) != 1 or layers is None or layers.kind != "repeat" or layers.condition is not None:
        return None
    layer_block = model.block(layers.target)
    layer = _unify_forward(layer_block, "Layer")
    if layer is None:
        return None
    norms = [(backbone, found["norm"]), (layer_block, layer["input_norm"]), (layer_block, layer["post_norm"])]
    if not all(_is(block, name, "primitive", "RMSNorm", {"eps", "unit_offset"}) for block, name in norms):
        return None  # the runtime checks that the norms share their eps and offset
    if not (_is(layer_block, layer["attn"], "block") and _is(layer_block, layer["mlp"], "block")):
        return None
    attention_block = model.block(layer_block.submodule(layer["attn"]).target)  # type: ignore[union-attr]
    attention = _unify_forward(attention_block, "Attention")
    mlp_block = model.block(layer_block.submodule(layer["mlp"]).target)  # type: ignore[union-attr]
    mlp = _match_mlp(mlp_block, activation_fields)
    if attention is None or mlp is None:
        return None
    linears = [(attention_block, attention[n]) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if not all(_is(block, name, "primitive", "Linear", {"bias"}) for block, name in linears):
        return None
    assert attention_block.forward is not None
    attend = next(c for c in attention_block.forward.calls() if c.func == "attend")
    if not {k for k, _ in attend.kwargs} <= _ATTEND_OPTIONS:
        return None
    window = attend.kwarg("window")
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
        head_dim=attention_block.forward.calls()[0].args[1],
        window=None if isinstance(window, ir.Const) and window.value is None else window,
        attention_block=attention_block.name,
        **mlp,
    )


def _match_mlp(block: ir.Block | None, activation_fields: set[str]) -> dict[str, str] | None:
    """A gated MLP's names (gate_proj, up_proj, down_proj, act), or a mixture of experts' (router,
    experts, act: the experts' activation field), or None."""
    mlp = _unify_forward(block, "MLP")
    if mlp is not None and mlp["act"] in activation_fields:
        assert block is not None
        names = ("gate_proj", "up_proj", "down_proj")
        if all(_is(block, mlp[n], "primitive", "Linear", {"bias"}) for n in names):
            return {n: mlp[n] for n in (*names, "act")}
        return None
    moe = _unify_forward(block, "Experts")
    if moe is None:
        return None
    assert block is not None
    if not (
        _is(block, moe["router"], "primitive", "Router", {"top_k", "normalize"})
        and _is(block, moe["experts"], "primitive", "Experts", {"act", "per_expert"})
    ):
        return None
    act = _argument(block.submodule(moe["experts"]), "act")  # type: ignore[arg-type]
    if not (isinstance(act, ir.Name) and act.id in activation_fields):
        return None
    return {"router": moe["router"], "experts": moe["experts"], "act": act.id}


def _unify_forward(block: ir.Block | None, pattern: str) -> dict[str, str] | None:
    """The pattern's names bound to the block's, when its forward has exactly the pattern's structure."""
    if block is None or block.forward is None:
        return None
    expected = _patterns()[pattern]
    actual = block.forward
    bindings: dict[str, str] = {}
    if len(expected.params) != len(actual.params) or len(expected.body) != len(actual.body):
        return None
    if not all(_bind(p, a, bindings) for p, a in zip(expected.params, actual.params, strict=True)):
        return None
    for want, have in zip(expected.body, actual.body, strict=True):
        if type(want) is not type(have):
            return None
        if isinstance(want, ir.Assign):
            assert isinstance(have, ir.Assign)
            if len(want.targets) != len(have.targets) or not all(
                _bind(p, a, bindings) for p, a in zip(want.targets, have.targets, strict=True)
            ):
                return None
        exprs = list(zip(ir.statement_exprs(want), ir.statement_exprs(have), strict=False))
        if len(ir.statement_exprs(want)) != len(ir.statement_exprs(have)):
            return None
        if not all(_unify(p, a, bindings) for p, a in exprs):
            return None
    return bindings


def _bind(pattern: str, actual: str, bindings: dict[str, str]) -> bool:
    if pattern in BUILTINS or pattern == "input_ids":  # literal names
        return pattern == actual
    return bindings.setdefault(pattern, actual) == actual


def _unify(pattern: ir.Expr, actual: ir.Expr, bindings: dict[str, str]) -> bool:
    if isinstance(pattern, ir.Name):
        return isinstance(actual, ir.Name) and _bind(pattern.id, actual.id, bindings)
    if isinstance(pattern, ir.BinOp):
        return (
            isinstance(actual, ir.BinOp)
            and pattern.op == actual.op
            and _unify(pattern.left, actual.left, bindings)
            and _unify(pattern.right, actual.right, bindings)
        )
    if isinstance(pattern, ir.Call):
        if not isinstance(actual, ir.Call) or len(pattern.args) != len(actual.args):
            return False
        # attend's options are checked apart (some are the kernel's, some are not); any other keyword
        # argument is not in the patterns, so a call that has one does not match
        if actual.kwargs and actual.func != "attend":
            return False
        return _bind(pattern.func, actual.func, bindings) and all(
            _unify(p, a, bindings) for p, a in zip(pattern.args, actual.args, strict=True)
        )
    return False


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


def _argument(sub: ir.Submodule, name: str) -> ir.Expr | None:
    """A primitive submodule's argument `name`, given by position or by keyword."""
    names = PRIMITIVES[sub.target].signature.names
    index = names.index(name)
    return sub.args[index] if index < len(sub.args) else dict(sub.kwargs).get(name)
