"""The library the language is built on: one entry per primitive, builtin, activation, task and field type.

Each entry holds everything about its concept: what a spec may write (its signature), what it needs from
the implicit context (rotary tables, the attention mask, the KV cache, the input ids), and how it is
spelled in generated Python (a template, see below). The validator reads the signatures, the analysis the
needs and the code generator the spellings; adding a builtin is adding one entry here.

Spelling templates are Python text with holes: `{x}` is the argument `x` as spelled by the generator,
`{x!atom}` the same, parenthesised unless it is atomic; `{@rope}`, `{@mask}`, `{@input_ids}` name the
context; `[[...]]` is a part written only when every argument inside it was given (and is not `none`).
Templates are data: the generator fills them with validated expressions only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    name: str
    default: object = REQUIRED  # a Python literal, or REQUIRED


@dataclass(frozen=True)
class Signature:
    name: str
    params: tuple[Param, ...]
    doc: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)


def _sig(name: str, doc: str, *params: str | tuple[str, object]) -> Signature:
    built = tuple(Param(p) if isinstance(p, str) else Param(p[0], p[1]) for p in params)
    return Signature(name, built, doc)


# ---- primitives: `name = Linear(hidden_size, vocab_size, bias = false)` -----------------------------
@dataclass(frozen=True)
class Primitive:
    signature: Signature
    constructor: str  # the class built, as the generated code names it
    module: str | None  # the specformer.runtime module it comes from; None: torch.nn (`nn.X`)
    positional: int  # leading arguments passed positionally; the rest by name, when not the default
    sizes: tuple[str, ...] = ()  # parameters that are sizes: positive for the default config
    inputs: int = 1  # tensors its forward takes
    returns: int = 1  # tensors its forward returns


PRIMITIVES: dict[str, Primitive] = {
    p.signature.name: p
    for p in (
        Primitive(
            _sig("Linear", "y = x W^T + b", "in_features", "out_features", ("bias", True)),
            "Linear",
            "layers",
            2,
            ("in_features", "out_features"),
        ),
        Primitive(
            _sig(
                "Embedding",
                "a lookup table; `sinusoidal` fixes it to sin/cos position codes; rows times `scale`",
                "num_embeddings",
                "embedding_dim",
                ("padding_idx", None),
                ("sinusoidal", False),
                ("scale", None),
            ),
            "Embedding",
            "layers",
            2,
            ("num_embeddings", "embedding_dim"),
        ),
        Primitive(
            _sig("RMSNorm", "x / rms(x) * w, or * (1 + w)", "dim", ("eps", 1e-6), ("unit_offset", False)),
            "RMSNorm",
            "layers",
            1,
            ("dim",),
        ),
        Primitive(
            _sig("LayerNorm", "(x - mean) / std * w + b", "dim", ("eps", 1e-5), ("bias", True)),
            "nn.LayerNorm",
            None,
            1,
            ("dim",),
        ),
        Primitive(
            _sig(
                "TransposedLinear",
                "y = x W + b, W stored (in, out)",
                "in_features",
                "out_features",
                ("bias", True),
            ),
            "TransposedLinear",
            "layers",
            2,
            ("in_features", "out_features"),
        ),
        Primitive(
            _sig(
                "PerHeadLayerNorm",
                "a LayerNorm per head of a (B, H, T, D) tensor",
                "num_heads",
                "dim",
                ("eps", 1e-5),
                ("bias", False),
            ),
            "PerHeadLayerNorm",
            "layers",
            2,
            ("num_heads", "dim"),
        ),
        Primitive(
            _sig("Rotary", "rotary position tables for a backbone", "dim", "rope", "max_position_embeddings"),
            "RotaryEmbedding",
            "rope",
            3,
            ("dim", "max_position_embeddings"),
        ),
        Primitive(
            _sig("Dropout", "zero activations with probability p while training", "p"), "nn.Dropout", None, 1
        ),
        Primitive(
            _sig(
                "Router",
                "each token's top_k experts and their weights: softmax(x W^T), the top_k kept, optionally "
                "rescaled to sum to one; `weights, chosen = router(x)`",
                "in_features",
                "num_experts",
                "top_k",
                ("normalize", False),
            ),
            "Router",
            "moe",
            3,
            ("in_features", "num_experts", "top_k"),
            returns=2,
        ),
        Primitive(
            _sig(
                "Experts",
                "num_experts gated MLPs down(act(gate(x)) * up(x)) stacked as 3-D tensors; "
                "`experts(x, chosen, weights)` runs each token's chosen ones, summed with their weights",
                "num_experts",
                "hidden_size",
                "intermediate_size",
                ("act", "silu"),
                ("per_expert", ("gate_proj", "up_proj", "down_proj")),
            ),
            "Experts",
            "moe",
            3,
            ("num_experts", "hidden_size", "intermediate_size"),
            inputs=3,
        ),
    )
}


# ---- builtins: functions a forward may call besides its submodules -----------------------------------
@dataclass(frozen=True)
class Builtin:
    signature: Signature
    spelling: str  # template, see the module docstring
    imports: tuple[tuple[str, str], ...] = ()  # (runtime module, name) the spelling uses
    returns: int = 1  # how many tensors, unless `count` names the argument that says
    count: str | None = None  # the parameter whose literal sets the count: an int, or a list's length
    needs: frozenset[str] = frozenset()  # implicit context: rope, mask, cache, input_ids
    tensor_params: int = 1  # leading positional params that are tensors; the rest are config scalars
    tensor_keywords: frozenset[str] = frozenset()  # keyword params that take a tensor too


BUILTINS: dict[str, Builtin] = {
    b.signature.name: b
    for b in (
        Builtin(
            _sig("split_heads", "(B, T, H*D) -> (B, H, T, D)", "x", "head_dim"),
            "{x!atom}.unflatten(-1, (-1, {head_dim})).transpose(1, 2)",
        ),
        Builtin(
            _sig("merge_heads", "(B, H, T, D) -> (B, T, H*D)", "x"), "{x!atom}.transpose(1, 2).flatten(2)"
        ),
        Builtin(
            _sig(
                "rotary",
                "rotate q and k by their positions (of one layer kind's tables)",
                "q",
                "k",
                ("kind", None),
            ),
            "apply_rotary({q}, {k}, {@rope}[[, {kind}]])",
            (("rope", "apply_rotary"),),
            returns=2,
            needs=frozenset({"rope"}),
            tensor_params=2,
        ),
        Builtin(
            _sig(
                "attend",
                "softmax(q k^T * scale + mask) v through the selected attention backend",
                "q",
                "k",
                "v",
                ("causal", False),
                ("window", None),
                ("dropout", 0.0),
                ("scale", None),
                ("softcap", None),
                ("bias", None),
            ),
            "attend({q}, {k}, {v}, {@mask}, causal={causal}[[, window={window}]]"
            "[[, dropout={dropout!atom} if self.training else 0.0]][[, scale={scale}]][[, softcap={softcap}]]"
            "[[, bias={bias}]])",
            (("attention", "attend"),),
            needs=frozenset({"mask"}),  # and the cache, when it may be causal (analysis.may_be_causal)
            tensor_params=3,
            tensor_keywords=frozenset({"bias"}),  # added to the scores: (B|1, H|1, T, S)
        ),
        Builtin(
            _sig("alibi", "ALiBi's distance penalty, -slope_h * |i - j|, as an attention bias", "num_heads"),
            "alibi_bias({num_heads}, {@mask})",
            (("attention", "alibi_bias"),),
            needs=frozenset({"mask"}),
            tensor_params=0,
        ),
        Builtin(
            _sig("dropout", "dropout while training", "x", "p"),
            "F.dropout({x}, p={p}, training=self.training)",
        ),
        Builtin(
            _sig("softcap", "tanh(x / cap) * cap: squashes x into (-cap, cap)", "x", "cap"),
            "torch.tanh({x!atom} / {cap!atom}) * {cap!atom}",
        ),
        Builtin(
            _sig("clip", "clamp x into [-bound, bound]", "x", "bound"),
            "{x!atom}.clamp(-{bound!atom}, {bound!atom})",
        ),
        Builtin(_sig("first_token", "x[:, 0]: the first position of each sequence", "x"), "{x!atom}[:, 0]"),
        Builtin(
            _sig("split_last", "split the last dim into n tensors, dropping it", "x", "n"),
            "{x!atom}.unbind(-1)",
            count="n",
        ),
        Builtin(
            _sig("chunk", "split the last dim into n equal parts (a fused projection)", "x", "n"),
            "{x!atom}.chunk({n}, dim=-1)",
            count="n",
        ),
        Builtin(
            _sig("split", "split the last dim into parts of the listed sizes", "x", "sizes"),
            "{x!atom}.split({sizes}, dim=-1)",
            count="sizes",
        ),
        Builtin(
            _sig("concat", "join two tensors along the last dim", "x", "y"),
            "torch.cat(({x}, {y}), dim=-1)",
            tensor_params=2,
        ),
        Builtin(_sig("squeeze_last", "drop a last dim of size 1", "x"), "{x!atom}.squeeze(-1)"),
        Builtin(
            _sig("mean_tokens", "each sequence's mean over its non-padding positions", "x"),
            "mean_tokens({x}, {@attention_mask})",
            (("losses", "mean_tokens"),),
            needs=frozenset({"attention_mask"}),
        ),
        Builtin(
            _sig("token_at", "each row's position `index` (its last when index is none)", "x", "index"),
            "token_at({x}, {index})",
            (("losses", "token_at"),),
            tensor_params=2,
        ),
        Builtin(
            _sig("last_token", "each sequence's last non-padding position", "x"),
            "last_token({x}, {@input_ids}, self.config.pad_token_id)",
            (("losses", "last_token"),),
            needs=frozenset({"input_ids"}),
        ),
    )
}


# ---- activations, by their Hugging Face names (`hidden_act`), callable by name in a forward ----------
@dataclass(frozen=True)
class Activation:
    name: str
    spelling: str  # template over `{x}`
    imports: tuple[tuple[str, str], ...] = ()


def _table_activation(name: str) -> Activation:
    """An activation torch has no function for: the runtime's table of them."""
    return Activation(name, f'ACTIVATIONS["{name}"]({{x}})', (("layers", "ACTIVATIONS"),))


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("silu", "F.silu({x})"),
        Activation("swish", "F.silu({x})"),
        Activation("gelu", "F.gelu({x})"),
        _table_activation("gelu_new"),
        Activation("gelu_pytorch_tanh", 'F.gelu({x}, approximate="tanh")'),
        _table_activation("gelu_fast"),
        _table_activation("quick_gelu"),
        Activation("relu", "F.relu({x})"),
        Activation("tanh", "torch.tanh({x})"),
        Activation("sigmoid", "torch.sigmoid({x})"),
    )
}


# ---- tasks: what a head computes, and what the generated head adds around it -------------------------
@dataclass(frozen=True)
class Task:
    name: str
    outputs: tuple[str, ...]  # what the spec's head forward returns, in order
    output: str  # output class in specformer.runtime.outputs
    labels: tuple[str, ...] = ()  # extra forward inputs, each `Tensor | None = None`
    loss: str | None = None  # loss expression over the outputs and labels (`self.config` in scope)
    loss_function: str | None = None  # what `loss` calls, from specformer.runtime.losses
    # extra forward inputs besides the labels: (name, annotation, default)
    inputs: tuple[tuple[str, str, str], ...] = ()
    hidden: str = "out.last_hidden_state"  # the backbone output the head's forward reads first
    generates: bool = False  # a causal LM: generation defaults, a fused training loss, the fused decode step
    choices: bool = False  # inputs come as (batch, choices, length) and are flattened to rows
    second: str = "out.pooler_output"  # what the head forward's second parameter reads
    # outputs back in (batch, choices, ...) shape, after the head forward (`choices` tasks)
    reshape: tuple[str, ...] = ("logits = logits.view(-1, num_choices)",)
    # further losses, each its own output field, computed when its label is given: (field, label, expression)
    more_losses: tuple[tuple[str, str, str], ...] = ()


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "causal_lm",
            ("logits",),
            "CausalLMOutput",
            ("labels",),
            "causal_lm_loss(logits, labels, num_items_in_batch)",
            "causal_lm_loss",
            inputs=(
                ("logits_to_keep", "int | torch.Tensor", "0"),
                # the label tokens of a whole gradient-accumulation window, which the summed loss is divided by
                ("num_items_in_batch", "int | torch.Tensor | None", "None"),
            ),
            hidden="keep_last(out.last_hidden_state, logits_to_keep)",  # only the positions asked for
            generates=True,
        ),
        Task(
            "sequence_classification",
            ("logits",),
            "SequenceClassifierOutput",
            ("labels",),
            "sequence_classification_loss(logits, labels, self.config.num_labels, self.config.problem_type)",
            "sequence_classification_loss",
        ),
        Task(
            "token_classification",
            ("logits",),
            "TokenClassifierOutput",
            ("labels",),
            "token_classification_loss(logits, labels)",
            "token_classification_loss",
        ),
        Task(
            "question_answering",
            ("start_logits", "end_logits"),
            "QuestionAnsweringOutput",
            ("start_positions", "end_positions"),
            "question_answering_loss(start_logits, end_logits, start_positions, end_positions)",
            "question_answering_loss",
        ),
        Task(
            "masked_lm",
            ("logits",),
            "MaskedLMOutput",
            ("labels",),
            "masked_lm_loss(logits, labels)",
            "masked_lm_loss",
        ),
        Task(
            "multiple_choice",
            ("logits",),
            "MultipleChoiceOutput",
            ("labels",),
            "multiple_choice_loss(logits, labels)",
            "multiple_choice_loss",
            choices=True,
        ),
        Task(
            # a language model over each choice and a score per choice (GPT-2's DoubleHeads)
            "lm_and_multiple_choice",
            ("logits", "mc_logits"),
            "LMAndMultipleChoiceOutput",
            ("labels",),
            "causal_lm_loss(logits, labels)",
            "causal_lm_loss",
            inputs=(("mc_token_ids", "torch.Tensor | None", "None"),),
            choices=True,
            second="mc_token_ids",
            reshape=(
                "logits = logits.unflatten(0, (-1, num_choices))",
                "mc_logits = mc_logits.view(-1, num_choices)",
            ),
            more_losses=(("mc_loss", "mc_labels", "multiple_choice_loss(mc_logits, mc_labels)"),),
        ),
        Task("dense_embedding", ("pooler_output",), "DenseEmbeddingOutput"),
        Task("span_reader", ("start_logits", "end_logits", "relevance_logits"), "SpanReaderOutput"),
    )
}


# ---- config field types ------------------------------------------------------------------------------
def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class FieldType:
    name: str
    python: str  # the constructor parameter's annotation
    check: Callable[[object, tuple[str, ...]], bool]  # (value, enum choices) -> whether it has the type


FIELD_TYPES: dict[str, FieldType] = {
    t.name: t
    for t in (
        FieldType("int", "int", lambda v, _: _is_int(v)),
        FieldType("float", "float", lambda v, _: isinstance(v, int | float) and not isinstance(v, bool)),
        FieldType("bool", "bool", lambda v, _: isinstance(v, bool)),
        FieldType("str", "str", lambda v, _: isinstance(v, str)),
        FieldType("activation", "str", lambda v, _: v in ACTIVATIONS),
        FieldType("rope", "dict", lambda v, _: isinstance(v, dict)),
        FieldType("list", "list", lambda v, _: isinstance(v, list)),
        FieldType("dict", "dict", lambda v, _: isinstance(v, dict)),
        FieldType("any", "Any", lambda v, _: True),
        FieldType("enum", "str", lambda v, choices: v in choices),
    )
}
# Types a spec spells by name (`enum(...)` has its own syntax).
TYPES: tuple[str, ...] = tuple(n for n in FIELD_TYPES if n != "enum")

# Inputs a backbone forward may name.
# `rope(theta_key = "rotary_emb_base")`: where older config.json files kept a rope parameter, at their
# top level; read into the rope parameters when the config has none.
ROPE_LEGACY_KEYS: dict[str, str] = {"theta_key": "rope_theta", "partial_key": "partial_rotary_factor"}

BACKBONE_INPUTS: tuple[str, ...] = ("input_ids", "token_type_ids", "position_ids")

# Attributes every config has from the runtime's base class, usable in expressions: type, and default.
BASE_CONFIG_FIELDS: dict[str, str] = {"num_labels": "int"}
BASE_CONFIG_DEFAULTS: dict[str, object] = {"num_labels": 2}

# ---- names the generated code itself uses -----------------------------------------------------------
# What the generated skeleton (not a library entry) imports from specformer.runtime: name -> module.
SKELETON_NAMES: dict[str, str] = {
    "PreTrainedModel": "modeling",
    "generation_defaults": "modeling",
    "PretrainedConfig": "config",
    "standardize_rope": "config",
    "AttentionMask": "attention",
    "Cache": "cache",
    "DynamicCache": "cache",
    "Rope": "rope",
    "BaseModelOutput": "outputs",
    "keep_last": "losses",
    "linear_cross_entropy": "losses",
    "activation": "layers",
    "DecoderPaths": "fused_decode",
    "register_decoder": "fused_decode",
}


def runtime_names() -> dict[str, str]:
    """Every name generated code may import from specformer.runtime, and its module: the skeleton's and
    each library entry's."""
    names = dict(SKELETON_NAMES)
    names |= {p.constructor: p.module for p in PRIMITIVES.values() if p.module is not None}
    names |= {name: module for b in BUILTINS.values() for module, name in b.imports}
    names |= {name: module for a in ACTIVATIONS.values() for module, name in a.imports}
    names |= {t.output: "outputs" for t in TASKS.values()}
    names |= {t.loss_function: "losses" for t in TASKS.values() if t.loss_function is not None}
    return names


# Locals the generated forwards define next to the spec's: the context a block receives, what heads and
# backbones add around the spec's statements. A spec's forward may not take these names.
FORWARD_NAMES: frozenset[str] = frozenset(
    {
        "rope",
        "mask",
        "cache",
        "past_key_values",
        "use_cache",
        "attention_mask",
        "out",
        "layer",
        "past",
        "loss",
    }
    | {"num_choices"}
    | {label for t in TASKS.values() for label in t.labels}
    | {name for t in TASKS.values() for name, _, _ in t.inputs}
    | {name for t in TASKS.values() for field, label, _ in t.more_losses for name in (field, label)}
)

# Attributes every config has (runtime/config.py): a field of one of these names would hide it.
CONFIG_ATTRIBUTES: frozenset[str] = frozenset(
    {
        "kwargs", "dtype", "torch_dtype", "architectures", "problem_type", "id2label", "label2id",
        "attn_implementation", "extra", "model_type", "attribute_map", "field_types", "to_dict",
        "to_json_string", "from_dict", "from_json_file", "from_pretrained", "save_pretrained",
    }
)  # fmt: skip

# Names a spec may never use for anything it defines: Python keywords, builtins that matter, and our own.
RESERVED: frozenset[str] = frozenset(
    {
        "self", "config", "torch", "nn", "F", "math", "super", "layer_idx", "cls", "None", "True", "False",
        "import", "exec", "eval", "open", "compile", "getattr", "setattr", "delattr", "globals", "locals",
        "vars", "object", "type", "input", "print", "breakpoint", "help", "id", "dir",
    }
)  # fmt: skip
