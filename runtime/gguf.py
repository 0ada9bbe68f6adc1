"""GGUF checkpoints (llama.cpp's format): config, weights and tokenizer from one file.

The container is read with the `gguf` package (an optional dependency, imported only here) and its
numpy dequantisers; tensor names are mapped to Hugging Face names, undoing the Q/K row permutation that
the HF -> GGUF conversion applies for rotary attention.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError

# GGUF tensor names (per layer after `blk.N.`) -> Hugging Face names for Llama-family decoders.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# GGUF architectures with the Llama tensor layout above -> (model_type, whether q/k rows were permuted).
# llama.cpp's converter permutes q/k for the Llama family (interleaved rotary), not for Qwen2 (NeoX style).
DECODER_ARCHITECTURES = {"llama": ("llama", True), "mistral": ("mistral", True), "qwen2": ("qwen2", False)}


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


def unpermute_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's conversion permutation of q/k rows (interleaved pairs back to rotate-half halves)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
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
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    _check_header(path)
    try:
        reader = gguf.GGUFReader(path)
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
    if arch not in DECODER_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: general.architecture is `{arch}`; supported: {', '.join(sorted(DECODER_ARCHITECTURES))}"
        )
    return reader, arch


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
        "token_types": field("tokenizer.ggml.token_type") or [],
        "merges": field("tokenizer.ggml.merges") or [],
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "pad_token_id": field("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(field("tokenizer.ggml.add_bos_token", False)),
        "chat_template": field("tokenizer.chat_template"),
    }


def read_gguf(path: str | os.PathLike, keep_quantized: bool = False) -> GGUFFile:
    """Read a llama-family GGUF into a Hugging Face style config dict and state dict (float32).

    With `keep_quantized`, linear weights stored as Q8_0, Q4_0 or Q4_1 stay integer, in the layout of
    `quantization.Int8Linear` / `Int4Linear` (`weight`, `scales`, and for int4 `offsets`): no float copy.
    """
    gguf = _gguf()
    reader, arch = _open(path)
    path = Path(path)
    model_type, permuted = DECODER_ARCHITECTURES[arch]

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default, path)

    tokens = _field(reader, "tokenizer.ggml.tokens", None, path) or []
    heads = _count(meta("attention.head_count"), f"{arch}.attention.head_count", path)
    kv_heads = _count(meta("attention.head_count_kv", heads), f"{arch}.attention.head_count_kv", path)
    hidden = _count(meta("embedding_length"), f"{arch}.embedding_length", path)
    if heads % kv_heads:
        raise CheckpointError(
            f"{path}: {arch}.attention.head_count ({heads}) is not a multiple of "
            f"{arch}.attention.head_count_kv ({kv_heads}); each key/value head serves a whole group"
        )
    _check_tensor_offsets(reader, path)
    config: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": meta("vocab_size", len(tokens)),
        "hidden_size": hidden,
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": meta("attention.key_length", hidden // heads),
        "max_position_embeddings": meta("context_length", 2048),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(meta("rope.freq_base", 10000.0))},
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", None, path),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id", None, path),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id", None, path),
    }
    scaling = meta("rope.scaling.type")
    if scaling in ("linear", "yarn"):
        config["rope_parameters"] |= {"rope_type": scaling, "factor": float(meta("rope.scaling.factor"))}
        if scaling == "yarn":
            original = meta("rope.scaling.original_context_length", config["max_position_embeddings"])
            config["rope_parameters"]["original_max_position_embeddings"] = original
    window = meta("attention.sliding_window")
    if window is not None:
        config["sliding_window"] = window

    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            raise CheckpointError(f"{path}: tensor `{tensor.name}` has no Hugging Face counterpart")
        if keep_quantized and name.endswith("_proj.weight") and tensor.tensor_type.name in _BLOCK_LAYOUTS:
            parts = _quantized_parts(tensor.data, tensor.tensor_type.name)
            for suffix, part in parts.items():
                if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
                    part = unpermute_rotary_rows(part, heads if "q_proj" in name else kv_heads)
                tensors[name.removesuffix("weight") + suffix] = part
            continue
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise CheckpointError(
                f"{path}: tensor `{tensor.name}` is stored as {tensor.tensor_type.name}, which cannot be dequantised"
            ) from None
        weight = torch.from_numpy(array.copy()).float()
        try:
            if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
                weight = unpermute_rotary_rows(weight, heads)
            elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
                weight = unpermute_rotary_rows(weight, kv_heads)
        except RuntimeError:  # rows that do not split into the header's heads
            raise CheckpointError(
                f"{path}: tensor `{tensor.name}` has shape {tuple(weight.shape)}, which does not split into "
                f"the {heads if 'q_proj' in name else kv_heads} heads the metadata declares"
            ) from None
        tensors[name] = weight
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors

    tokenizer = _tokenizer_metadata(reader, path)
    return GGUFFile(arch, config, tensors, tokenizer, str(path))


# llama.cpp block layouts we keep as integers: bytes per block of 32 values.
_BLOCK_LAYOUTS = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def _quantized_parts(raw: Any, kind: str) -> dict[str, torch.Tensor]:
    """Split a Q8_0/Q4_0/Q4_1 tensor's raw (rows, blocks * bytes) data into weight, scales and offsets."""
    data = torch.from_numpy(raw.copy())
    blocks = data.reshape(data.shape[0], -1, _BLOCK_LAYOUTS[kind])  # (rows, blocks, bytes)
    scales = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1).float()
    if kind == "Q8_0":
        return {"weight": blocks[..., 2:].contiguous().view(torch.int8).flatten(1), "scales": scales}
    if kind == "Q4_0":  # w = d * (q - 8)
        return {"weight": blocks[..., 2:].contiguous(), "scales": scales, "offsets": -8 * scales}
    offsets = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()  # Q4_1: w = d * q + m
    return {"weight": blocks[..., 4:].contiguous(), "scales": scales, "offsets": offsets}


def _hf_name(name: str) -> str | None:
    stem, _, suffix = name.rpartition(".")
    if stem.startswith("blk."):
        _, index, part = stem.split(".", 2)
        mapped = _LAYER_NAMES.get(part)
        return f"model.layers.{index}.{mapped}.{suffix}" if mapped else None
    mapped = _GLOBAL_NAMES.get(stem)
    return f"{mapped}.{suffix}" if mapped else None
