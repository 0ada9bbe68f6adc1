"""Writing small GGUF files the way llama.cpp's converter (convert_hf_to_gguf.py) does, for tests: metadata
read from a transformers model's config, tensor names from the gguf package's TensorNameMap (the table
the converter itself uses), the converter's value changes for each family, a BPE or SentencePiece
vocabulary, and weights in several storage types.

The family-specific lines here mirror the converter's `modify_tensors` methods; the loader under test
knows none of them (it reads the specs' `gguf` layouts and the layers' own storage rules).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello specs",
    "numbers 12 345 6789",
]


def bpe_tokenizer(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS * 50, trainer)
    return tokenizer


def sentencepiece_vocab(merges: int = 120) -> list[tuple[str, float, int]]:
    """A SentencePiece-style BPE vocabulary as llama.cpp stores one: (piece, score, token type), with
    <unk>/<s>/</s>, the 256 byte tokens and pieces whose scores give their merge order."""
    trainer = trainers.BpeTrainer(vocab_size=merges + 60, special_tokens=[])
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.train_from_iterator(CORPUS * 50, trainer)
    pieces = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    vocab = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    vocab += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    vocab += [(piece, -float(i), 1) for i, piece in enumerate(pieces)]
    vocab += [("<|im_start|>", 0.0, 3), ("<|im_end|>", 0.0, 3), ("<think>", 0.0, 4)]
    return vocab


def permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half halves -> interleaved pairs."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def k_quant_blocks(rows: int, cols: int, qtype: str, seed: int = 0) -> np.ndarray:
    """Random K-quant (or Q5_0) bytes (gguf can read but not write these) with small, finite block scales."""
    kind = gguf.GGMLQuantizationType[qtype]
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, cols // block_values, block_bytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    if qtype in ("Q4_K", "Q5_K"):  # d and dmin lead the block
        data[..., 0:2] = scale
        data[..., 2:4] = scale
    elif qtype == "Q5_0":  # d leads the block
        data[..., 0:2] = scale
    elif qtype == "Q2_K":  # 16 bytes of scales, 64 of quants, then d and dmin
        data[..., -4:-2] = scale
        data[..., -2:] = scale
    else:  # Q3_K and Q6_K: d ends the block
        data[..., -2:] = scale
    return data.reshape(rows, -1)


def _hparam(config: Any, *names: str) -> Any:
    """The first of `names` the config has (not None), as the converter's `find_hparam` reads them."""
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)


def _write_metadata(writer: gguf.GGUFWriter, arch: str, config: Any) -> None:
    """TextModel.set_gguf_parameters and the families' additions."""
    hidden = _hparam(config, "hidden_size", "n_embd")
    heads = _hparam(config, "num_attention_heads", "n_head")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    writer.add_context_length(_hparam(config, "max_position_embeddings", "n_positions"))
    writer.add_embedding_length(hidden)
    writer.add_block_count(_hparam(config, "num_hidden_layers", "n_layer"))
    writer.add_feed_forward_length(_hparam(config, "intermediate_size", "n_inner") or 4 * hidden)
    writer.add_head_count(heads)
    if getattr(config, "num_key_value_heads", None) is not None:
        writer.add_head_count_kv(config.num_key_value_heads)
    if getattr(config, "head_dim", None) is not None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    rope = getattr(config, "rope_parameters", None)
    if rope:
        global_rope = rope.get("full_attention", rope)
        writer.add_rope_freq_base(global_rope["rope_theta"])
        partial = global_rope.get("partial_rotary_factor") or 1.0
        writer.add_rope_dimension_count(int(partial * head_dim))
        if "sliding_attention" in rope:
            writer.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    if getattr(config, "rms_norm_eps", None) is not None:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    eps = _hparam(config, "layer_norm_eps", "layer_norm_epsilon")
    if eps is not None:
        writer.add_layer_norm_eps(eps)
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(config.sliding_window)
    if arch == "gemma3":
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if arch == "gptneox":
        writer.add_parallel_residual(config.use_parallel_residual)
    experts = _hparam(config, "num_experts", "num_local_experts")
    if experts:  # Qwen2MoeModel / Qwen3MoeModel.set_gguf_parameters
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        if getattr(config, "moe_intermediate_size", None):  # Mixtral's experts are intermediate_size wide
            writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        if getattr(config, "shared_expert_intermediate_size", None):
            writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
        if getattr(config, "norm_topk_prob", False):
            writer.add_expert_weights_norm(True)
    writer.add_vocab_size(config.vocab_size)


def _converted(arch: str, config: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The converter's `modify_tensors`: what each family changes before naming."""
    out: dict[str, torch.Tensor] = {}
    norms: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in state.items():
        tensor = tensor.detach().float().clone()
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute(tensor, config.num_attention_heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute(tensor, config.num_key_value_heads)
        elif arch.startswith("gemma") and name.endswith("norm.weight"):
            tensor = tensor + 1  # Gemma norms scale by (1 + w); llama.cpp stores the scale
        elif arch == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            tensor = tensor.T  # Conv1D (in, out) -> (out, in)
        elif arch == "gptneox" and name.endswith(("query_key_value.weight", "query_key_value.bias")):
            heads = config.num_attention_heads
            grouped = tensor.reshape(heads, 3, -1, *tensor.shape[1:])
            tensor = torch.cat([grouped[:, i].reshape(-1, *tensor.shape[1:]) for i in range(3)])
        if name.endswith(".experts.gate_up_proj"):  # one (E, I, H) tensor each for gate and up, as the
            stem = name.removesuffix(".gate_up_proj")  # converter merges per-expert checkpoints
            gate, up = tensor.chunk(2, dim=1)
            out[f"{stem}.gate_proj.weight"], out[f"{stem}.up_proj.weight"] = (
                gate.contiguous(),
                up.contiguous(),
            )
            continue
        if name.endswith(".experts.down_proj"):
            out[f"{name}.weight"] = tensor
            continue
        if name.endswith("shared_expert_gate.weight"):
            tensor = tensor.squeeze(0)  # a one-row matrix, stored as a vector
        if arch == "stablelm" and "layernorm.norms." in name:  # _stack_qk_norm
            stem, _, rest = name.partition(".norms.")
            head, _, leaf = rest.partition(".")
            norms.setdefault(f"{stem}.{leaf}", {})[int(head)] = tensor
            continue
        out[name] = tensor
    for name, heads in norms.items():
        out[name] = torch.stack([heads[h] for h in sorted(heads)])
    return out


def write_gguf(
    path: Path,
    arch: str,
    model: torch.nn.Module,
    qtype: str,
    tokenizer: Tokenizer | list[tuple[str, float, int]],
    raw: dict[str, tuple[np.ndarray, str]] | None = None,
) -> None:
    """A transformers causal LM as a GGUF file of weight type `qtype`, with a BPE tokenizer or a
    SentencePiece vocabulary (`sentencepiece_vocab`). `raw`: tensors written as given bytes of a quantised
    type, replacing the model's values."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    _write_metadata(writer, arch, config)
    if isinstance(tokenizer, Tokenizer):
        _write_bpe(writer, tokenizer)
    else:
        _write_sentencepiece(writer, tokenizer)
    writer.add_chat_template(CHAT_TEMPLATE)
    enum = {name: member for member, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(enum, _hparam(config, "num_hidden_layers", "n_layer"))
    tied = getattr(config, "tie_word_embeddings", False)
    for name, tensor in _converted(arch, config, model.state_dict()).items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None or (tied and gguf_name == "output.weight"):
            assert gguf_name is not None or name.endswith(("lm_head.weight", ".attn.bias")), name
            continue
        data = tensor.numpy()
        kind = gguf.GGMLQuantizationType[qtype] if qtype != "F32" else None
        block = gguf.GGML_QUANT_SIZES[kind][0] if kind is not None else 1
        if raw and name in raw:
            blocks, raw_kind = raw[name]
            writer.add_tensor(gguf_name, blocks, raw_dtype=gguf.GGMLQuantizationType[raw_kind])
        elif (
            kind is not None
            and data.ndim in (2, 3)
            and data.shape[-1] % block == 0
            and "norm" not in gguf_name
        ):
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_bpe(writer: gguf.GGUFWriter, tokenizer: Tokenizer) -> None:
    import json

    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [
        m if isinstance(m, str) else " ".join(m) for m in json.loads(tokenizer.to_str())["model"]["merges"]
    ]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)


def _write_sentencepiece(writer: gguf.GGUFWriter, vocab: list[tuple[str, float, int]]) -> None:
    """TextModel._set_vocab_sentencepiece: pieces, scores and types; no merges."""
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([p for p, _, _ in vocab])
    writer.add_token_scores([s for _, s, _ in vocab])
    writer.add_token_types([t for _, _, t in vocab])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)
