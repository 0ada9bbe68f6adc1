"""One-token decode steps as a single fused CPU kernel, for decoders whose spec it recognises.

A compiled op-by-op step of a small model still makes hundreds of kernel calls a token, and each
parallel one ends with the threads waiting for each other while the memory bus idles. The decode rate is
bounded by reading the weights once per token; `bench/generate.py` prints both sides' rates and the share
of that bound each reaches. `specformer_cpu::DecodePlan` runs the whole step (the embedding lookup, every
layer's norms, projections, rotary, cache write, masked attention and gated MLP, then the final norm and
the head) in one parallel region that streams the weights back to back; Python only hands it the
tokens, their positions, the attention mask and the caches.

It needs to know the decoder's structure for certain, so it takes it from the code generator: when a spec's
dataflow is exactly a pre-norm rotary decoder with a gated MLP (Llama, Mistral, Qwen2, Gemma and any spec
written the same way) or with a mixture of gated experts behind a router (Mixtral), the generated package
registers where its causal LM keeps those modules
(`register_decoder`, attribute paths only: the modeling code carries nothing for it), and `generate()`
decodes through the kernel over a dynamic or static cache, eager or with `compile=True`
(nothing to compile). Anything the kernel does not cover (activations other than SwiGLU and GeGLU, partial
rotary, quantized or LoRA layers, gradients, a GPU) decodes op by op or through `torch.compile`.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

import torch
from torch import nn

from . import cpu_kernels
from .cache import DynamicCache, StaticCache
from .kernels import DECODE_ROWS
from .layers import Activation, RMSNorm, is_plain_linear
from .moe import Experts, Router
from .outputs import CausalLMOutput
from .quantization import PackedEmbedding
from .quantization.weight_only import QUANTIZED_LINEARS
from .rope import RotaryEmbedding

_ATTENTION = ("q", "k", "v", "o")  # the projections, by the kernel's names
_GATED_MLP = ("gate", "up", "down")
# The gated activations the kernel computes, by the name a config gives them.
_GATES = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class LayerLayout:
    """One decoder layer: x += o(attend(rotary(q, k), v)) of input_norm(x); x += down(act(gate) * up) of
    post_norm(x), or that MLP of each of the row's experts `router` picks among `experts`, weighted.
    `window` is the layer's sliding attention window (None: none)."""

    input_norm: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    post_norm: nn.Module
    act: nn.Module
    window: int | None
    gate: nn.Module | None = None
    up: nn.Module | None = None
    down: nn.Module | None = None
    router: Router | None = None
    experts: Experts | None = None


@dataclass(frozen=True)
class DecoderLayout:
    """A causal LM as the fused step reads it: embedding, layers, final norm, rotary tables, head."""

    head_dim: int
    embed: nn.Module
    layers: list[LayerLayout]
    norm: nn.Module
    rotary: nn.Module
    head: nn.Module


@dataclass(frozen=True)
class DecoderPaths:
    """Where a causal LM keeps the fused step's modules: attribute paths from the model (`backbone`,
    `head`, `head_dim` on its config), from the backbone (`embed`, `layers`, `norm`, `rotary`) and from
    each layer (the rest). `window` leads from a layer to its sliding attention window; None: full."""

    backbone: str
    embed: str
    layers: str
    norm: str
    rotary: str
    head: str
    head_dim: str
    input_norm: str
    q: str
    k: str
    v: str
    o: str
    post_norm: str
    act: str
    gate: str | None = None
    up: str | None = None
    down: str | None = None
    router: str | None = None  # a mixture of experts (runtime/moe.py) in place of gate, up and down
    experts: str | None = None
    window: str | None = None


_DECODERS: dict[type, DecoderPaths] = {}


def register_decoder(model_class: type, paths: DecoderPaths) -> None:
    """Declare that `model_class` (and its subclasses) decode through the fused step, with its modules
    at `paths`. Generated packages call it for specs whose dataflow is the step's."""
    _DECODERS[model_class] = paths


def decoder_paths(model_class: type) -> DecoderPaths | None:
    return next((_DECODERS[c] for c in model_class.__mro__ if c in _DECODERS), None)


def decoder_layout(model: nn.Module) -> DecoderLayout | None:
    """The model's modules in the fused step's order, or None when its class registered none."""
    paths = decoder_paths(type(model))
    if paths is None:
        return None
    backbone = attrgetter(paths.backbone)(model)

    def layer_layout(layer: nn.Module) -> LayerLayout:
        window = attrgetter(paths.window)(layer) if paths.window is not None else None
        parts = ("input_norm", *_ATTENTION, "post_norm", "act", *_GATED_MLP, "router", "experts")
        found = {p: attrgetter(getattr(paths, p))(layer) for p in parts if getattr(paths, p) is not None}
        return LayerLayout(**found, window=window)

    return DecoderLayout(
        head_dim=attrgetter(paths.head_dim)(model.config),
        embed=attrgetter(paths.embed)(backbone),
        layers=[layer_layout(layer) for layer in attrgetter(paths.layers)(backbone)],
        norm=attrgetter(paths.norm)(backbone),
        rotary=attrgetter(paths.rotary)(backbone),
        head=attrgetter(paths.head)(model),
    )


class FusedDecoder:
    """Callable like the model for one-token steps over a static or dynamic cache: the next token's logits."""

    def __init__(self, layout: DecoderLayout, activation: str, int8_activations: bool) -> None:
        self.layout = layout
        self.activation = activation
        self.int8_activations = int8_activations
        router = layout.layers[0].router
        self.top_k = router.top_k if router is not None else 0  # experts each row runs; 0: a dense MLP
        self.normalize_top_k = router is not None and router.normalize
        self.unit_offset = layout.norm.unit_offset
        self.scale = layout.head_dim**-0.5
        self.eps = layout.norm.eps
        # each layer's tensors by the names the kernel knows them by; biases only where the model has them
        self.layers: list[dict[str, torch.Tensor]] = []
        for layer in layout.layers:
            tensors = {"input_norm": layer.input_norm.weight, "post_norm": layer.post_norm.weight}
            for name in _ATTENTION if layer.experts is not None else (*_ATTENTION, *_GATED_MLP):
                linear = getattr(layer, name)
                tensors |= _matrix(name, linear)
                if linear.bias is not None:
                    tensors[f"{name}_bias"] = linear.bias
            if layer.experts is not None:
                tensors |= {
                    "router": layer.router.weight,
                    "experts_gate_up": layer.experts.gate_up_proj,
                    "experts_down": layer.experts.down_proj,
                }
            self.layers.append(tensors)
        parts = _matrix("head", layout.head)
        self.head = parts.pop("head")
        self.head_parts = parts  # the scales (and offsets) of a packed output projection
        embed = layout.embed
        # a packed embedding's rows are a packed matrix's, looked up in its blocks
        parts = _matrix("embedding", embed.table if isinstance(embed, PackedEmbedding) else embed)
        self.embedding = parts.pop("embedding")
        self.embedding_parts = parts
        self.windows = [layer.window or 0 for layer in layout.layers]
        self.dtype = layout.norm.weight.dtype
        self._cos = self._sin = torch.empty(0, layout.head_dim, dtype=self.dtype)  # rotary rows, by position
        self._rows = torch.arange(DECODE_ROWS)
        # the kernel's side of the model, checked on its first step and kept (specformer_cpu::DecodePlan)
        self.plan = torch.classes.specformer_cpu.DecodePlan(
            self.layers,
            layout.norm.weight,
            self.head,
            self.head_parts,
            self.embedding,
            self.embedding_parts,
            getattr(embed, "scale", None),
            self.windows,
            self.eps,
            self.scale,
            self.unit_offset,
            activation,
            int8_activations,
            self.top_k,
            self.normalize_top_k,
        )

    def __call__(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: StaticCache | DynamicCache,
        use_cache: bool = True,
        logits_to_keep: int = 1,
    ) -> CausalLMOutput:
        """The model's forward for a one-token step: it always caches and returns that token's logits."""
        if not use_cache or logits_to_keep != 1:
            raise ValueError("the fused decode step caches its token and returns its logits only")
        slot, keys, values = past_key_values.reserve(1)
        cos, signed_sin, rows = self._rotary(position_ids, slot)
        logits = self.plan.step(input_ids, rows, attention_mask, keys, values, cos, signed_sin, slot)
        return CausalLMOutput(logits=logits[:, None])

    def _rotary(
        self, position_ids: torch.Tensor, slot: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotary tables (cos, signed sin), each (positions, head_dim), and each row's row in them: one
        table for every position up to the cache's (positions count a row's tokens, so none is past its
        slot), grown as decoding goes; where the tables depend on the sequence's length, this step's own."""
        rotary = self.layout.rotary
        if not rotary.by_position:
            cos, signed_sin = rotary(position_ids).prepared(self.dtype)
            return cos.flatten(0, 2), signed_sin.flatten(0, 2), self._rows[: position_ids.shape[0]]
        if slot >= self._cos.shape[0]:
            rows = max(slot + 1, 2 * self._cos.shape[0], 256)
            cos, signed_sin = rotary(torch.arange(rows)[None]).prepared(self.dtype)
            self._cos, self._sin = cos.flatten(0, 2), signed_sin.flatten(0, 2)
        return self._cos, self._sin, position_ids


def _matrix(name: str, linear: nn.Module) -> dict[str, torch.Tensor]:
    """A projection's tensors by the kernel's names: the weight, or packed blocks with their scales
    (float16 as stored, others as float32) and offsets, where the matrix has them, beside them."""
    if not isinstance(linear, QUANTIZED_LINEARS):
        return {name: linear.weight}
    dtype = torch.float16 if linear.scales.dtype == torch.float16 else torch.float32
    packed = {name: linear.weight.flatten(1), f"{name}_scales": linear.scales.to(dtype).contiguous()}
    if linear.offsets is not None:
        packed[f"{name}_offsets"] = linear.offsets.to(dtype).contiguous()
    return packed


def _projection(module: nn.Module) -> bool:
    """A linear layer the step can read: plain, or packed weight-only int8/int4 (GGUF blocks)."""
    if isinstance(module, QUANTIZED_LINEARS):
        return module.weight.is_contiguous()
    return is_plain_linear(module) and module.weight.is_contiguous()


def fused_decoder(model: nn.Module, batch: int) -> FusedDecoder | None:
    """The fused step for `model` decoding `batch` rows (into a static or dynamic cache), or None where it
    does not apply. Called with gradients off, as `generate` runs."""
    if decoder_paths(type(model)) is None or model.training or batch > DECODE_ROWS or _hooked(model):
        return None
    if cpu_kernels.ops() is None:
        return None
    layout = decoder_layout(model)
    assert layout is not None
    dtype = layout.norm.weight.dtype
    packed_table = isinstance(layout.embed, PackedEmbedding)  # rows of the packed head's blocks
    tensors = [layout.norm.weight] if packed_table else [layout.embed.weight, layout.norm.weight]
    norms = [layout.norm]
    activations: set[str | None] = set()
    packed = [layout.head] if isinstance(layout.head, QUANTIZED_LINEARS) else []
    routers = set()
    for layer in layout.layers:
        if layer.experts is not None:
            if not _plain_experts(layer.router, layer.experts):
                return None
            routers.add((layer.router.top_k, layer.router.normalize))
            tensors += [layer.router.weight, layer.experts.gate_up_proj, layer.experts.down_proj]
        mlp = (layer.gate, layer.up, layer.down) if layer.experts is None else ()
        linears = (layer.q, layer.k, layer.v, layer.o, *mlp)
        if not all(_projection(m) for m in linears):
            return None  # LoRA, bitsandbytes, tensor-parallel...
        packed += [m for m in linears if isinstance(m, QUANTIZED_LINEARS)]
        if not (isinstance(layer.act, Activation) and layer.act.kernel == "torch"):
            return None
        activations.add(_GATES.get(layer.act.name))
        tensors += [m.weight for m in linears if not isinstance(m, QUANTIZED_LINEARS)]
        tensors += [m.bias for m in linears if m.bias is not None]
        norms += [layer.input_norm, layer.post_norm]
    if not isinstance(layout.head, QUANTIZED_LINEARS):
        tensors.append(layout.head.weight)
    if not all(type(n) is RMSNorm and n.kernel == "torch" for n in norms) or len(activations) != 1:
        return None
    if len(routers) > 1 or (routers and any(layer.experts is None for layer in layout.layers)):
        return None  # one routing and one kind of MLP per step
    (activation,) = activations
    if (
        activation is None
        or len({(n.eps, n.unit_offset) for n in norms}) != 1
        or not isinstance(layout.embed, nn.Embedding | PackedEmbedding)
        or (packed_table and layout.embed.dtype != dtype)
        or (packed_table and layout.embed.table.scales.dtype not in (torch.float16, torch.float32))
        or getattr(layout.embed, "sinusoidal", False)
        or getattr(layout.embed, "max_norm", None) is not None
        or not _projection(layout.head)
        or getattr(layout.head, "bias", None) is not None
    ):
        return None
    rotary = layout.rotary
    if (
        not isinstance(rotary, RotaryEmbedding)
        or rotary.kinds is not None
        or rotary.inv_freq.numel() * 2 != layout.head_dim
    ):
        return None  # partial rotary
    if not (cpu_kernels.applies(*tensors) and all(t.dtype == dtype for t in tensors)):
        return None
    arithmetic = {m.activations for m in packed}
    if len(arithmetic) > 1:
        return None  # one step, one arithmetic: layers asking for both decode op by op
    return FusedDecoder(layout, activation, arithmetic == {"int8"})


def _plain_experts(router: Router | None, experts: Experts) -> bool:
    """A router and experts the step can read: every expert here (no expert parallelism), no adapter,
    nobody collecting router logits, the weights in contiguous plain tensors."""
    return (
        type(router) is Router
        and type(experts) is Experts
        and router.recorded is None
        and router.bias is None
        and experts.adapter is None
        and experts.group is None
        and experts.local_experts == experts.num_experts
        and all(
            type(t) in (torch.Tensor, nn.Parameter) and t.is_contiguous()
            for t in (router.weight, experts.gate_up_proj, experts.down_proj)
        )
    )


def _hooked(model: nn.Module) -> bool:
    """Forward hooks would never fire inside the kernel (it calls no module's forward): leave such models
    to their forwards."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
