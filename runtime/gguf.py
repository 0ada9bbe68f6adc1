"""GGUF checkpoints (llama.cpp's format): config, weights and tokenizer from one file.

Nothing here knows a model family. The file's `general.architecture` picks the generated package whose
spec declares it (`gguf "llama"`); config values come from the `gguf` package's metadata keys through one
table of Hugging Face field names; tensor names come from the `gguf` package's own `TensorNameMap`,
applied to the model's state-dict keys. What llama.cpp's converter changed on the way in is undone by
whoever knows it: the spec's row orders (Llama's interleaved rotary pairs, GPT-NeoX's fused rows), and
each layer for its own storage (`from_gguf` on a layer: a Gemma norm's +1, a transposed linear, stacked
per-head norms). The container is read in one pass by `gguf_container.py`; the `gguf` package (an
optional dependency, imported only when a file is read) supplies the block types, the name tables and the
numpy dequantisers for blocks that are not kept packed (Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K linears stay packed by
default).
"""

from __future__ import annotations

import fnmatch
import os
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import CheckpointError
from .checkpoint_layout import stored_paths
from .config import ConfigError, PretrainedConfig
from .gguf_container import GGUFContainer
from .layers import is_plain_linear
from .moe import Experts
from .registry import gguf_architectures, model_class


@dataclass
class GGUFFile:
    architecture: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer: dict[str, Any] = field(default_factory=dict)
    source: str = "<gguf>"


def _gguf():
    from .hardware import require

    return require("gguf", "reading .gguf files")


def _field(reader: Any, key: str, default: Any = None, source: object = "GGUF file") -> Any:
    entry = reader.fields.get(key)
    if entry is None:
        return default
    try:
        return entry.contents()
    except (UnicodeDecodeError, ValueError, IndexError, TypeError) as err:
        raise CheckpointError(
            f"{source}: metadata `{key}` cannot be read ({type(err).__name__}: {err})"
        ) from None


def _count(value: Any, key: str, source: object) -> int:
    """A size or count from the metadata: a positive integer, or the file is not usable."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"{source}: metadata `{key}` is {value!r}; expected a positive integer")
    return value


def reorder_rows(weight: torch.Tensor, shape: tuple[int, ...], order: tuple[int, ...]) -> torch.Tensor:
    """Rows as a file keeps them -> ours: view the rows as `shape` (one entry may be -1), take its axes
    in `order`. Whole rows move, so packed quantized rows reorder as well as float ones."""
    rest = weight.shape[1:]
    return (
        weight.reshape(*shape, *rest)
        .permute(*order, *range(len(shape), len(shape) + len(rest)))
        .reshape(weight.shape)
    )


# The smallest a metadata entry and a tensor description can be: a field's key length and type, a
# tensor's name length, rank, one dimension, type and offset.
_MIN_KV_BYTES, _MIN_TENSOR_BYTES = 12, 32


def _check_header(path: Path) -> None:
    """Refuse a file whose header claims more entries than its size can hold, before a reader loops over
    them: a lying count would otherwise cost time and memory without end."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header = handle.read(24)
    if len(header) < 24 or header[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a readable GGUF file (no GGUF header in its first 24 bytes)")
    version = struct.unpack("<I", header[4:8])[0]
    tensors, entries = struct.unpack(
        "<II" if version == 1 else "<QQ", header[8:16] if version == 1 else header[8:24]
    )
    if tensors * _MIN_TENSOR_BYTES + entries * _MIN_KV_BYTES > size:
        raise CheckpointError(
            f"{path}: its header claims {tensors:,} tensors and {entries:,} metadata entries, more than its "
            f"{size:,} bytes can hold; the file is corrupt"
        )


def _check_tensor_offsets(reader: Any, path: Path) -> None:
    """Tensor data starts at a multiple of `general.alignment` from the data section, as llama.cpp
    requires; an offset that is not was not written by a converter."""
    alignment = _field(reader, "general.alignment", 32, path)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path}: general.alignment is {alignment!r}; expected a power of two")
    for tensor in reader.tensors:
        if (tensor.data_offset - reader.data_offset) % alignment:
            raise CheckpointError(
                f"{path}: tensor `{tensor.name}` starts at byte {tensor.data_offset:,}, not aligned to "
                f"{alignment} bytes; the file is corrupt"
            )


def _open(path: str | os.PathLike) -> tuple[Any, str]:
    _gguf()  # the block types and dequantisers come from the gguf package: say so now if it is missing
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    _check_header(path)
    try:
        reader = GGUFContainer(path)
    except (
        ValueError,
        OSError,
        KeyError,
        IndexError,
        UnicodeDecodeError,
        OverflowError,
        struct.error,
    ) as err:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None
    arch = _field(reader, "general.architecture", source=path)
    if not isinstance(arch, str):
        raise CheckpointError(f"{path}: general.architecture is {arch!r}; expected a name such as `llama`")
    return reader, arch


def gguf_model_type(path: str | os.PathLike) -> str:
    """The model_type of the spec that declares this file's architecture (and, of several, fits its
    tensors best)."""
    reader, arch = _open(path)
    return _choose(reader, arch, None, Path(path))[3].config_class.model_type


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The tokenizer settings and chat template of a GGUF file, without reading its tensors."""
    reader, _ = _open(path)
    return _tokenizer_metadata(reader, path)


def _tokenizer_metadata(reader: Any, source: object) -> dict[str, Any]:
    def field(key: str, default: Any = None) -> Any:
        return _field(reader, key, default, source)

    return {
        "model": field("tokenizer.ggml.model"),
        "pre": field("tokenizer.ggml.pre"),
        "tokens": field("tokenizer.ggml.tokens") or [],
        "scores": field("tokenizer.ggml.scores") or [],
        "token_types": field("tokenizer.ggml.token_type") or [],
        "merges": field("tokenizer.ggml.merges") or [],
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "pad_token_id": field("tokenizer.ggml.padding_token_id"),
        "unk_token_id": field("tokenizer.ggml.unknown_token_id"),
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
        "add_bos_token": bool(
            field("tokenizer.ggml.add_bos_token", field("tokenizer.ggml.model") == "llama")
        ),
        "add_space_prefix": bool(field("tokenizer.ggml.add_space_prefix", True)),
        "chat_template": field("tokenizer.chat_template"),
    }


# ---- which model -------------------------------------------------------------------------------------
def _candidates(arch: str, requested: type[nn.Module] | None, path: Path) -> list[type[nn.Module]]:
    """The causal LMs that may read a file of this architecture: the requested one, or every spec that
    declares it (the file's tensors choose among several)."""
    if requested is not None:
        declared = getattr(requested, "gguf_architecture", None)
        if declared != arch:
            what = f"declares `{declared}`" if declared else "declares no gguf layout"
            raise CheckpointError(
                f"{path}: a `{arch}` file; {requested.__name__}'s spec {what}, so its tensors cannot be "
                "placed (load it with `load_causal_lm`, which picks the model the file names)"
            )
        return [model_class(requested.config_class.model_type)]
    known = gguf_architectures()
    if arch not in known:
        raise CheckpointError(
            f"{path}: general.architecture is `{arch}`; supported: {', '.join(sorted(known))} (a spec "
            f'declares the GGUF architecture it is stored as with `gguf "{arch}"`)'
        )
    return known[arch]


# ---- config ------------------------------------------------------------------------------------------
def _config_keys(gguf: Any) -> dict[str, tuple[str, ...]]:
    """`{arch}.` metadata keys (the gguf package's names) -> the config fields they fill, in Hugging Face's
    spellings; the first one a spec has (as a field or alias) is used."""
    llm, attention = gguf.Keys.LLM, gguf.Keys.Attention
    return {
        llm.CONTEXT_LENGTH: ("max_position_embeddings",),
        llm.EMBEDDING_LENGTH: ("hidden_size",),
        llm.BLOCK_COUNT: ("num_hidden_layers",),
        llm.FEED_FORWARD_LENGTH: ("intermediate_size",),
        llm.VOCAB_SIZE: ("vocab_size",),
        llm.USE_PARALLEL_RESIDUAL: ("use_parallel_residual",),
        llm.ATTN_LOGIT_SOFTCAPPING: ("attn_logit_softcapping",),
        llm.FINAL_LOGIT_SOFTCAPPING: ("final_logit_softcapping",),
        attention.HEAD_COUNT: ("num_attention_heads",),
        attention.HEAD_COUNT_KV: ("num_key_value_heads",),
        attention.KEY_LENGTH: ("head_dim",),
        attention.LAYERNORM_RMS_EPS: ("rms_norm_eps",),
        attention.LAYERNORM_EPS: ("layer_norm_eps", "layer_norm_epsilon", "norm_eps"),
        attention.SLIDING_WINDOW: ("sliding_window",),
        llm.EXPERT_COUNT: ("num_experts", "num_local_experts"),
        llm.EXPERT_USED_COUNT: ("num_experts_per_tok",),
        llm.EXPERT_FEED_FORWARD_LENGTH: ("moe_intermediate_size",),
        llm.EXPERT_SHARED_FEED_FORWARD_LENGTH: ("shared_expert_intermediate_size",),
        llm.EXPERT_WEIGHTS_NORM: ("norm_topk_prob",),
    }


_TOKEN_IDS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}


def _spec_field(config_class: type[PretrainedConfig], names: tuple[str, ...]) -> str | None:
    """The first of `names` this config declares, through its aliases."""
    for name in names:
        name = config_class.attribute_map.get(name, name)
        if name in config_class.field_types:
            return name
    return None


def _read_config(reader: Any, arch: str, config_class: type[PretrainedConfig], path: Path) -> dict[str, Any]:
    gguf = _gguf()

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, key.format(arch=arch), default, path)

    config: dict[str, Any] = {"model_type": config_class.model_type}
    unplaced: dict[str, tuple[str, Any]] = {}  # values the spec has no field for: checked once built
    for key, names in _config_keys(gguf).items():
        value = meta(key)
        if value is None:
            continue
        if isinstance(value, float) and value != value:
            raise CheckpointError(f"{path}: metadata `{key.format(arch=arch)}` is NaN")
        target = _spec_field(config_class, names)
        if target is None:
            unplaced[key.format(arch=arch)] = (names[0], value)
        else:
            config[target] = value
    for key in (gguf.Keys.LLM.BLOCK_COUNT, gguf.Keys.LLM.EMBEDDING_LENGTH, gguf.Keys.Attention.HEAD_COUNT):
        _count(meta(key), key.format(arch=arch), path)
    if "vocab_size" not in config and _field(reader, "tokenizer.ggml.tokens", None, path):
        config["vocab_size"] = len(_field(reader, "tokenizer.ggml.tokens", None, path))
    for key, name in _TOKEN_IDS.items():
        if name in config_class.field_types:
            config[name] = _field(reader, key, None, path)
    if "tie_word_embeddings" in config_class.field_types:
        config["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    pattern = meta(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN)
    if isinstance(pattern, list) and "layer_types" in config_class.field_types:
        config["layer_types"] = ["sliding_attention" if swa else "full_attention" for swa in pattern]
    rope_field = next((n for n, t in config_class.field_types.items() if t == "rope"), None)
    if rope_field is not None:
        config[rope_field] = _rope_parameters(meta, config_class, rope_field, config)
    config["_unplaced"] = unplaced
    return config


def _rope_parameters(meta: Any, config_class: type[PretrainedConfig], rope_field: str, config: dict) -> dict:
    gguf = _gguf()
    rope = gguf.Keys.Rope
    default = getattr(config_class(), rope_field)
    scaled: dict[str, Any] = {"rope_type": "default"}
    scaling = meta(rope.SCALING_TYPE)
    if scaling in ("linear", "yarn"):
        scaled = {"rope_type": scaling, "factor": float(meta(rope.SCALING_FACTOR))}
        if scaling == "yarn":
            original = meta(rope.SCALING_ORIG_CTX_LEN, config.get("max_position_embeddings"))
            scaled["original_max_position_embeddings"] = original
    base, base_swa = meta(rope.FREQ_BASE), meta(rope.FREQ_BASE_SWA)
    if default and all(isinstance(v, dict) for v in default.values()):  # one table per layer kind
        kinds = {}
        for kind, params in default.items():
            sliding = kind == "sliding_attention"
            theta = base_swa if sliding else base
            kinds[kind] = (
                {"rope_type": "default", "rope_theta": params.get("rope_theta")} if sliding else dict(scaled)
            )
            if theta is not None:
                kinds[kind]["rope_theta"] = float(theta)
            kinds[kind].setdefault("rope_theta", params.get("rope_theta"))
        return kinds
    params = dict(scaled, rope_theta=float(base) if base is not None else default.get("rope_theta"))
    dims = meta(rope.DIMENSION_COUNT)
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (hidden // heads if isinstance(hidden, int) and heads else None)
    if isinstance(dims, int) and head_dim:
        params["partial_rotary_factor"] = dims / head_dim
    return params


# ---- tensors -----------------------------------------------------------------------------------------
def _name_map(model: nn.Module, arch: str, blocks: int) -> dict[str, str]:
    """GGUF tensor base name (`blk.0.attn_q`) -> our module path, from the gguf package's TensorNameMap.
    A module with no GGUF name of its own (a per-head norm's `norms.3`) belongs to the nearest
    enclosing module that has one."""
    gguf = _gguf()
    enum = {name: member for member, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(enum, blocks)
    found: dict[str, str] = {}
    for key in model.state_dict():
        path = key.rpartition(".")[0]
        while path:
            gguf_name = names.get_name(path)
            if gguf_name is not None:
                found.setdefault(gguf_name, path)
                break
            path = path.rpartition(".")[0]
    return found


def _expert_bases(model: nn.Module, arch: str, blocks: int) -> dict[str, tuple[str, str]]:
    """GGUF base names of expert stacks (`blk.0.ffn_gate_exps`, llama.cpp's (E, out, in) tensors of every
    expert's projection) -> (our `Experts` path, "gate" | "up" | "down"), named as the gguf package names
    each expert's projection (`mlp.experts.gate_proj`)."""
    gguf = _gguf()
    enum = {name: member for member, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(enum, blocks)
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, Experts):
            for part, stored in zip(("gate", "up", "down"), module.per_expert, strict=True):
                bases = (names.get_name(f"{p}.{stored}") for p in stored_paths(model, path))
                base = next((b for b in bases if b is not None), None)
                if base is not None:
                    found[base] = (path, part)
    return found


def _expected(model: nn.Module, names: dict[str, str]) -> set[str]:
    """The GGUF tensors this model needs: every parameter's module, except tied copies."""
    tied = set(getattr(model, "active_ties", lambda: [])())
    paths = {path: base for base, path in names.items()}
    needed = set()
    for key in model.state_dict():
        if key in tied:
            continue
        module_path, _, leaf = key.rpartition(".")
        path = module_path
        while path and path not in paths:
            path = path.rpartition(".")[0]
        if path:
            tail = key[len(path) + 1 :]
            needed.add(f"{paths[path]}.{tail if '.' not in tail else leaf}")
    return needed


# Tensors llama.cpp derives from the config and stores for its own kernels; transformers does not keep them.
_DERIVED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def _choose(
    reader: Any, arch: str, requested: type[nn.Module] | None, path: Path
) -> tuple[PretrainedConfig, nn.Module, dict[str, str], type[nn.Module]]:
    """Config, meta model and tensor names of the candidate spec whose tensors fit the file's best."""
    present = {t.name for t in reader.tensors if t.name not in _DERIVED}
    fits = []
    for cls in _candidates(arch, requested, path):
        config_dict = _read_config(reader, arch, cls.config_class, path)
        unplaced = config_dict.pop("_unplaced")
        try:
            config = cls.config_class.from_dict(config_dict)
        except ConfigError as err:
            raise CheckpointError(
                f"{path}: its metadata does not make a {cls.__name__} config: {err}"
            ) from None
        _check_unplaced(config, unplaced, path)
        fits.append((*_fit_flags(cls, config, present, arch, path), cls))
        if fits[-1][0] == 0:
            break  # every tensor placed: no other spec can fit better (the preferred one is tried first)
    _, config, model, names, cls = min(fits, key=lambda fit: fit[0])  # the fewest tensors left unplaced
    return config, model, names, cls


def _fit_flags(
    cls: type[nn.Module], config: PretrainedConfig, present: set[str], arch: str, path: Path
) -> tuple[int, PretrainedConfig, nn.Module, dict[str, str]]:
    """Config booleans that only decide which tensors exist (biases, a norm per sublayer) are not in the
    metadata; read them off the file's tensors: flip the ones that bring the model's tensor names
    closer to the file's, one at a time."""
    from .meta import build_on_meta

    def attempt(candidate: PretrainedConfig) -> tuple[int, nn.Module, dict[str, str]]:
        model = build_on_meta(cls, candidate, path)
        names = _name_map(model, arch, _blocks(candidate))
        expected = _expected(model, names) | {
            f"{b}.weight" for b in _expert_bases(model, arch, _blocks(candidate))
        }
        return len(expected ^ present), model, names

    best, model, names = attempt(config)
    flags = [n for n, t in type(config).field_types.items() if t == "bool" and n != "tie_word_embeddings"]
    while best:
        trials = []
        for flag in flags:
            candidate = type(config).from_dict(config.to_dict() | {flag: not getattr(config, flag)})
            trials.append((*attempt(candidate), candidate))
        if not trials or min(t[0] for t in trials) >= best:
            break
        best, model, names, config = min(trials, key=lambda t: t[0])
    return best, config, model, names


def _blocks(config: PretrainedConfig) -> int:
    counts = [getattr(config, n) for n in getattr(type(config), "repeat_counts", ())]
    return max([c for c in counts if isinstance(c, int)] or [0])


def read_gguf(
    path: str | os.PathLike, keep_quantized: bool = False, model_class: type[nn.Module] | None = None
) -> GGUFFile:
    """Read a GGUF file into a Hugging Face style config dict and state dict (float32), for the model its
    architecture names (or `model_class`, whose spec must declare that architecture).

    With `keep_quantized`, linear weights stored as Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K or Q6_K stay integer, in the layout of
    `quantization.Int8Linear` / `Int4Linear` (`weight`, `scales`, and `offsets` where the type has minimums): no float copy.
    A token embedding tied to the output projection is then that projection's blocks only (its float
    table is left out: `from_gguf` looks rows up in the blocks, `quantization.PackedEmbedding`).
    """
    reader, arch = _open(path)
    path = Path(path)
    _check_tensor_offsets(reader, path)
    config, model, names, cls = _choose(reader, arch, model_class, path)
    for name in sorted({t.name for t in reader.tensors} & set(_DERIVED)):
        warnings.warn(f"{path}: `{name}` is derived by llama.cpp from the config; not loaded", stacklevel=2)
    orders = _row_orders(model)
    experts = _expert_bases(model, arch, _blocks(config))
    halves: dict[str, dict[str, torch.Tensor]] = {}  # an expert stack's gate and up, until both are read
    tensors: dict[str, torch.Tensor] = {}
    # a token embedding the tied head keeps packed: its blocks only, no float table (`PackedEmbedding`)
    packed = _packed_tied_outputs(reader, model, names) if keep_quantized else {}
    tables = {f"{source.rpartition('.')[0]}.weight" for tied, source in model.tied_weights().items()
              if f"{tied.rpartition('.')[0]}.scales" in packed}  # fmt: skip
    gguf_tables = {f"{base}.weight" for base, module in names.items() if f"{module}.weight" in tables}
    packed_stacks = _packed_stacks(reader, experts) if keep_quantized else set()
    for tensor in reader.tensors:
        if tensor.name in _DERIVED or tensor.name in gguf_tables:
            continue
        if tensor.name.rpartition(".")[0] in experts:
            stack, part = experts[tensor.name.rpartition(".")[0]]
            if stack in packed_stacks:  # each expert's projection its own packed layer (`PackedExperts`)
                tensors |= _per_expert(tensor, stack, part)
                continue
            halves.setdefault(stack, {})[part] = _dequantize(tensor, path)
            if part == "down":
                tensors[f"{stack}.down_proj"] = halves[stack].pop(part)
            elif {"gate", "up"} <= halves[stack].keys():  # stacked as the model keeps them: (E, 2I, H)
                tensors[f"{stack}.gate_up_proj"] = torch.cat(
                    [halves[stack].pop("gate"), halves[stack].pop("up")], 1
                )
            continue
        for key, value in _convert(tensor, model, names, orders, keep_quantized, path):
            tensors[key] = value
    tensors |= packed
    config_out = config.to_dict()
    config_out["model_type"] = cls.config_class.model_type
    return GGUFFile(arch, config_out, tensors, _tokenizer_metadata(reader, path), str(path))


def _packed_stacks(reader: Any, experts: dict[str, tuple[str, str]]) -> set[str]:
    """The expert stacks whose gate, up and down tensors are all in types kept packed."""
    kinds: dict[str, set[bool]] = {}
    for tensor in reader.tensors:
        found = experts.get(tensor.name.rpartition(".")[0])
        if found is not None:
            kinds.setdefault(found[0], set()).add(tensor.tensor_type.name in _BLOCK_LAYOUTS)
    return {stack for stack, packable in kinds.items() if packable == {True}}


def _per_expert(tensor: Any, stack: str, part: str) -> dict[str, torch.Tensor]:
    """llama.cpp's (E, out, in) stack of one projection as each expert's packed layer (`<stack>.<part>.<e>.`
    `weight`, `scales`, `offsets`): views of one unpacking of the stack's blocks."""
    raw = np.asarray(tensor.data)
    count, rows = raw.shape[0], raw.shape[1]
    parts = _quantized_parts(raw.reshape(count * rows, -1), tensor.tensor_type.name)
    return {
        f"{stack}.{part}.{e}.{name}": value.unflatten(0, (count, rows))[e]
        for name, value in parts.items()
        for e in range(count)
    }


def _packed_tied_outputs(reader: Any, model: nn.Module, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """An output projection tied to the token embedding, kept in the embedding's packed blocks, as
    llama.cpp computes it: decoding reads the file's 8 or 4 bits per weight for the largest matrix of a
    small model, not a float copy; the embedding looks its rows up in the same blocks."""
    tensors = {t.name: t for t in reader.tensors}
    gguf_names = {path: base for base, path in names.items()}
    packed = {}
    for tied, source in model.tied_weights().items():  # e.g. lm_head.weight <- model.embed_tokens.weight
        module, source_module = tied.rpartition(".")[0], source.rpartition(".")[0]
        tensor = tensors.get(f"{gguf_names.get(source_module)}.weight")
        if tensor is None or tensor.tensor_type.name not in _BLOCK_LAYOUTS:
            continue
        if isinstance(model.get_submodule(module), nn.Linear):
            for part, value in _quantized_parts(tensor.data, tensor.tensor_type.name).items():
                packed[f"{module}.{part}"] = value
    return packed


def _check_unplaced(config: PretrainedConfig, unplaced: dict[str, tuple[str, Any]], path: Path) -> None:
    """A value the spec has no field for must be what the spec computes (GPT-2's heads all have keys)."""
    for key, (name, value) in unplaced.items():
        ours = getattr(config, name, None)
        if name == "num_key_value_heads" and ours is None:
            ours = config.num_attention_heads
        if ours is not None and isinstance(value, int | float) and ours != value:
            raise CheckpointError(
                f"{path}: metadata `{key}` is {value}, but {type(config).__name__} has {name} = {ours} and "
                "no field to set it"
            )


def _row_orders(model: nn.Module) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    orders = getattr(model, "gguf_row_orders", None)
    if orders is None:
        return {}
    prefix = f"{model.base_model_prefix}."
    return {prefix + pattern: order for pattern, order in orders().items()}


def _order_for(path: str, orders: dict) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    return next((o for pattern, o in orders.items() if fnmatch.fnmatchcase(path, pattern)), None)


# llama.cpp block layouts we keep as integers: bytes per block of 32 values.
_BLOCK_LAYOUTS = {
    "Q8_0": 34,
    "Q4_0": 18,
    "Q4_1": 20,
    "Q5_0": 22,
    "Q5_1": 24,
    "Q4_K": 144,
    "Q5_K": 176,
    "Q6_K": 210,
}


def _convert(
    tensor: Any, model: nn.Module, names: dict[str, str], orders: dict, keep_quantized: bool, path: Path
) -> Iterator[tuple[str, torch.Tensor]]:
    """One GGUF tensor -> our state-dict entries."""
    base, _, suffix = tensor.name.rpartition(".")
    module_path = names.get(base)
    if module_path is None:
        yield from _split_fused(tensor, model, names, orders, path)
        return
    module = model.get_submodule(module_path)
    order = _order_for(module_path, orders)
    kind = tensor.tensor_type.name
    convert = getattr(module, "from_gguf", None)  # a layer that stores its values its own way
    # plain linears only: a Router (an nn.Linear that also picks experts) keeps its float weight
    packable = is_plain_linear(module) and convert is None and kind in _BLOCK_LAYOUTS
    if keep_quantized and packable and suffix == "weight":
        for part, value in _quantized_parts(tensor.data, kind).items():
            yield f"{module_path}.{part}", _reordered(value, order, tensor.name, path)
        return
    value = _reordered(_dequantize(tensor, path), order, tensor.name, path)
    if isinstance(module, nn.Linear) and suffix == "weight" and value.shape == (module.in_features,):
        value = value[None]  # llama.cpp keeps a one-row matrix (a shared expert's gate) as a vector
    try:
        converted = convert(suffix, value) if convert else {suffix: value}
    except ValueError as err:
        raise CheckpointError(
            f"{path}: tensor `{tensor.name}` cannot be stored in `{module_path}`: {err}"
        ) from None
    for local, part in converted.items():
        yield f"{module_path}.{local}", part


def _reordered(value: torch.Tensor, order: Any, name: str, path: Path) -> torch.Tensor:
    if order is None:
        return value
    try:
        return reorder_rows(value, *order)
    except RuntimeError:  # rows that do not split into the heads the metadata declares
        raise CheckpointError(
            f"{path}: tensor `{name}` has shape {tuple(value.shape)}, whose rows do not split as "
            f"{order[0]} (the heads and sizes the metadata declares)"
        ) from None


def _dequantize(tensor: Any, path: Path) -> torch.Tensor:
    gguf = _gguf()
    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise CheckpointError(
            f"{path}: tensor `{tensor.name}` is stored as {tensor.tensor_type.name}, which cannot be dequantised"
        ) from None
    return torch.from_numpy(array.copy()).float()


def _split_fused(
    tensor: Any, model: nn.Module, names: dict[str, str], orders: dict, path: Path
) -> Iterator[tuple[str, torch.Tensor]]:
    """A fused query/key/value tensor (`attn_qkv`, older converters) for a model with three projections:
    rows split by the projections' sizes, in that order."""
    base, _, suffix = tensor.name.rpartition(".")
    stem = base.removesuffix(".attn_qkv")
    parts = [names.get(f"{stem}.{p}") for p in ("attn_q", "attn_k", "attn_v")]
    if not base.endswith(".attn_qkv") or None in parts:
        raise CheckpointError(f"{path}: tensor `{tensor.name}` has no counterpart in {type(model).__name__}")
    value = _dequantize(tensor, path)
    sizes = [model.get_submodule(p).weight.shape[0] for p in parts]
    if value.shape[0] != sum(sizes):
        raise CheckpointError(
            f"{path}: tensor `{tensor.name}` has {value.shape[0]} rows; expected {' + '.join(map(str, sizes))}"
        )
    for part, rows in zip(parts, value.split(sizes), strict=True):
        yield f"{part}.{suffix}", _reordered(rows.contiguous(), _order_for(part, orders), tensor.name, path)


def _quantized_parts(raw: Any, kind: str) -> dict[str, torch.Tensor]:
    """Split a packed tensor's raw (rows, blocks * bytes) data into the weight, scales and offsets of
    an int8/int4 layer (`quantization/weight_only.py`): Q8_0/Q4_0/Q4_1 as they are (float16 scales and
    minimums; Q4_0 symmetric, no offsets); Q5_0, Q5_1 and the K-quants Q4_K, Q5_K and Q6_K unpacked into the same
    per-group form."""
    if kind in _UNPACKED:
        return _UNPACKED[kind](np.asarray(raw).reshape(raw.shape[0], -1, _BLOCK_LAYOUTS[kind]))
    data = torch.from_numpy(raw.copy())
    blocks = data.reshape(data.shape[0], -1, _BLOCK_LAYOUTS[kind])  # (rows, blocks, bytes)
    scales = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1)
    if kind == "Q8_0":
        return {"weight": blocks[..., 2:].contiguous().view(torch.int8).flatten(1), "scales": scales}
    if kind == "Q4_0":  # w = d * (q - 8): a symmetric layer
        return {"weight": blocks[..., 2:].contiguous(), "scales": scales}
    offsets = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1)  # Q4_1: w = d * q + m
    return {"weight": blocks[..., 4:].contiguous(), "scales": scales, "offsets": offsets}


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block, as float32."""
    return np.ascontiguousarray(blocks[..., start : start + 2]).view(np.float16)[..., 0].astype(np.float32)


def _k_scales_mins(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and mins packed in bytes 4..16 of a Q4_K/Q5_K super-block (ggml's
    get_scale_min_k4), each (rows, blocks, 8)."""
    packed = blocks[..., 4:16].astype(np.uint8)
    shape = blocks.shape[:2]
    scales, mins = np.empty((*shape, 8), np.uint8), np.empty((*shape, 8), np.uint8)
    scales[..., :4], mins[..., :4] = packed[..., 0:4] & 63, packed[..., 4:8] & 63
    scales[..., 4:] = (packed[..., 8:12] & 15) | ((packed[..., 0:4] >> 6) << 4)
    mins[..., 4:] = (packed[..., 8:12] >> 4) | ((packed[..., 4:8] >> 6) << 4)
    return scales, mins


def _k_group_scales(blocks: np.ndarray) -> dict[str, torch.Tensor]:
    """A Q4_K/Q5_K super-block's groups of 32 as scale and offset: w = q * (d * scale_j) - dmin * min_j."""
    d, dmin = _half(blocks, 0), _half(blocks, 2)
    scales, mins = _k_scales_mins(blocks)
    rows = blocks.shape[0]
    return {
        "scales": torch.from_numpy((d[..., None] * scales.astype(np.float32)).reshape(rows, -1)),
        "offsets": torch.from_numpy((-(dmin[..., None] * mins.astype(np.float32))).reshape(rows, -1)),
    }


def _q4_k_parts(blocks: np.ndarray) -> dict[str, torch.Tensor]:
    """Q4_K super-blocks of 256 (d, dmin, twelve bytes of 6-bit scales and mins, 128 bytes of nibbles) as
    int4 groups of 32: w = q * d * scale_j - dmin * min_j, ggml's `dequantize_row_q4_K`, exactly."""
    shape = blocks.shape[:2]
    nibbles = blocks[..., 16:].reshape(*shape, 4, 32)  # sub-blocks 2p and 2p+1 share 32 bytes
    values = np.stack([nibbles & 15, nibbles >> 4], axis=3).reshape(*shape, 8, 32)
    weight = values[..., :16] | (
        values[..., 16:] << 4
    )  # our layout: a group's halves in low and high nibbles
    rows = blocks.shape[0]
    return {
        "weight": torch.from_numpy(np.ascontiguousarray(weight.reshape(rows, -1, 16))),
        **_k_group_scales(blocks),
    }


def _q5_k_parts(blocks: np.ndarray) -> dict[str, torch.Tensor]:
    """Q5_K super-blocks of 256 (d, dmin, twelve bytes of 6-bit scales and mins, 32 bytes of fifth bits,
    128 of nibbles) as int8 groups of 32 with offsets: w = q * d * scale_j - dmin * min_j, q in 0..31,
    ggml's `dequantize_row_q5_K`, exactly (40 bytes a group for the file's 22, like Q4_K's 24 for 18)."""
    rows, count = blocks.shape[:2]
    high = blocks[..., 16:48]  # bit j of byte l: the fifth bit of value l of sub-block j
    nibbles = blocks[..., 48:].reshape(rows, count, 4, 32)  # sub-blocks 2p and 2p+1 share 32 bytes
    low = np.stack([nibbles & 15, nibbles >> 4], axis=3).reshape(rows, count, 8, 32)
    fifth = (high[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # (rows, count, 8, 32)
    q = low | (fifth << 4)
    return {"weight": torch.from_numpy(q.astype(np.int8).reshape(rows, -1)), **_k_group_scales(blocks)}


def _q6_k_parts(blocks: np.ndarray) -> dict[str, torch.Tensor]:
    """Q6_K super-blocks of 256 (128 bytes of low nibbles, 64 of high bit pairs, sixteen int8 scales, d)
    as int8 groups of 16: w = d * scale_j * (q - 32), ggml's `dequantize_row_q6_K`, exactly."""
    rows, count = blocks.shape[:2]
    low = blocks[..., :128].reshape(rows, count, 2, 2, 32)  # (half of 128, first/second 32 bytes, l)
    high = blocks[..., 128:192].reshape(rows, count, 2, 32)
    scales = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32)
    d = _half(blocks, 208)
    quarters = [  # y[l + 32 * i] within each half of 128 values, for i = 0..3
        (low[..., 0, :] & 15) | ((high & 3) << 4),
        (low[..., 1, :] & 15) | (((high >> 2) & 3) << 4),
        (low[..., 0, :] >> 4) | (((high >> 4) & 3) << 4),
        (low[..., 1, :] >> 4) | (((high >> 6) & 3) << 4),
    ]
    q = np.stack(quarters, axis=3).astype(np.int16) - 32  # (rows, count, half, quarter, 32)
    return {
        "weight": torch.from_numpy(q.astype(np.int8).reshape(rows, -1)),
        "scales": torch.from_numpy((d[..., None] * scales).reshape(rows, -1)),
    }


def _fifth_bit_values(blocks: np.ndarray, start: int) -> np.ndarray:
    """The 5-bit values 0..31 of Q5_0/Q5_1 blocks: four bytes of fifth bits at `start` (bit j: value j's),
    then sixteen of nibbles (values 0..15 low, 16..31 high)."""
    fifth = np.ascontiguousarray(blocks[..., start : start + 4]).view("<u4")[..., 0]
    bits = (fifth[..., None] >> np.arange(32, dtype=np.uint32)) & 1
    nibbles = blocks[..., start + 4 : start + 20]
    low = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).astype(np.int16)
    return low | (bits.astype(np.int16) << 4)


def _q5_0_parts(blocks: np.ndarray) -> dict[str, torch.Tensor]:
    """Q5_0 blocks of 32 (d, four bytes of fifth bits, sixteen of nibbles) as int8 groups of 32:
    w = d * (q - 16), ggml's `dequantize_row_q5_0`, exactly. (Stored wider than the file, 34 bytes a
    block for 22, so they take the int8 kernels: llama.cpp's Q4_K_M falls back to Q5_0 for matrices
    whose width is not a multiple of 256, most of a small model's.)"""
    q = _fifth_bit_values(blocks, 2) - 16
    return {
        "weight": torch.from_numpy(q.astype(np.int8).reshape(blocks.shape[0], -1)),
        "scales": torch.from_numpy(_half(blocks, 0).astype(np.float16)),  # d itself: exact
    }


def _q5_1_parts(blocks: np.ndarray) -> dict[str, torch.Tensor]:
    """Q5_1 blocks of 32 (d, m, four bytes of fifth bits, sixteen of nibbles) as int8 groups of 32 with
    offsets: w = d * q + m, q in 0..31, ggml's `dequantize_row_q5_1`, exactly."""
    q = _fifth_bit_values(blocks, 4)
    return {
        "weight": torch.from_numpy(q.astype(np.int8).reshape(blocks.shape[0], -1)),
        "scales": torch.from_numpy(_half(blocks, 0).astype(np.float16)),
        "offsets": torch.from_numpy(_half(blocks, 2).astype(np.float16)),
    }


# Packed types that need unpacking into the int8/int4 layers' form
_UNPACKED = {
    "Q4_K": _q4_k_parts, "Q5_K": _q5_k_parts, "Q6_K": _q6_k_parts, "Q5_0": _q5_0_parts, "Q5_1": _q5_1_parts,
}  # fmt: skip
