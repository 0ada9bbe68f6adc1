"""The library the language is built on: module primitives, forward builtins, activations, tasks, types.

This is data shared by the validator (what a spec may say) and the code generator (how to emit it).
Adding a primitive means adding its signature here and its emission in `codegen`.
"""

from __future__ import annotations

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


# Submodule constructors: `name = Linear(hidden_size, vocab_size, bias = false)`.
PRIMITIVES: dict[str, Signature] = {
    s.name: s
    for s in (
        _sig("Linear", "y = x W^T + b", "in_features", "out_features", ("bias", True)),
        _sig(
            "Embedding",
            "a lookup table; `sinusoidal` fixes it to sin/cos position codes; rows times `scale`",
            "num_embeddings",
            "embedding_dim",
            ("padding_idx", None),
            ("sinusoidal", False),
            ("scale", None),
        ),
        _sig("RMSNorm", "x / rms(x) * w, or * (1 + w)", "dim", ("eps", 1e-6), ("unit_offset", False)),
        _sig("LayerNorm", "(x - mean) / std * w + b", "dim", ("eps", 1e-5), ("bias", True)),
        _sig("Rotary", "rotary position tables for a backbone", "dim", "rope", "max_position_embeddings"),
        _sig("Dropout", "zero activations with probability p while training", "p"),
    )
}


# Functions a forward may call besides its submodules. `needs` names the implicit context they read.
@dataclass(frozen=True)
class Builtin:
    signature: Signature
    returns: int = 1  # how many tensors; 0: as many as its literal `n` argument
    needs: frozenset[str] = frozenset()
    tensor_params: int = 1  # leading positional params that are tensors; the rest are config scalars


BUILTINS: dict[str, Builtin] = {
    b.signature.name: b
    for b in (
        Builtin(_sig("split_heads", "(B, T, H*D) -> (B, H, T, D)", "x", "head_dim")),
        Builtin(_sig("merge_heads", "(B, H, T, D) -> (B, T, H*D)", "x")),
        Builtin(_sig("rotary", "rotate q and k by their positions", "q", "k"), 2, frozenset({"rope"}), 2),
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
            ),
            1,
            frozenset({"mask"}),
            3,
        ),
        Builtin(_sig("dropout", "dropout while training", "x", "p")),
        Builtin(_sig("first_token", "x[:, 0]: the first position of each sequence", "x")),
        Builtin(_sig("split_last", "split the last dim into n tensors, dropping it", "x", "n"), returns=0),
        Builtin(_sig("squeeze_last", "drop a last dim of size 1", "x")),
        Builtin(
            _sig("last_token", "each sequence's last non-padding position", "x"),
            needs=frozenset({"input_ids"}),
        ),
    )
}

# Activation functions by their Hugging Face names (`hidden_act`), callable by name in a forward.
ACTIVATIONS: tuple[str, ...] = (
    "silu",
    "swish",
    "gelu",
    "gelu_new",
    "gelu_pytorch_tanh",
    "gelu_fast",
    "quick_gelu",
    "relu",
    "tanh",
    "sigmoid",
)

# Task heads: the names of the outputs a head's forward returns, in order. The runtime supplies each
# task's extra inputs (labels, ...), its loss and its output type.
TASKS: dict[str, tuple[str, ...]] = {
    "causal_lm": ("logits",),
    "sequence_classification": ("logits",),
    "token_classification": ("logits",),
    "question_answering": ("start_logits", "end_logits"),
    "masked_lm": ("logits",),
    "multiple_choice": ("logits",),
    "dense_embedding": ("pooler_output",),
    "span_reader": ("start_logits", "end_logits", "relevance_logits"),
}

# Config field types.
TYPES: tuple[str, ...] = ("int", "float", "bool", "str", "activation", "rope", "list", "dict", "any")

# Inputs a backbone forward may name.
BACKBONE_INPUTS: tuple[str, ...] = ("input_ids", "token_type_ids", "position_ids")

# Attributes every config has from the runtime's base class, usable in expressions.
BASE_CONFIG_FIELDS: dict[str, str] = {"num_labels": "int"}

# Names a spec may never use for anything it defines: Python keywords, builtins that matter, and our own.
RESERVED: frozenset[str] = frozenset(
    {
        "self", "config", "torch", "nn", "F", "math", "super", "layer_idx", "cls", "None", "True", "False",
        "import", "exec", "eval", "open", "compile", "getattr", "setattr", "delattr", "globals", "locals",
        "vars", "object", "type", "input", "print", "breakpoint", "help", "id", "dir",
    }
)  # fmt: skip
