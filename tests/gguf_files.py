"""Writing small GGUF files the way llama.cpp's converter does, for tests: metadata, a BPE tokenizer, and
weights in several storage types, with the q/k row permutation for the Llama family."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def bpe_tokenizer(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [
        "the quick brown fox jumps over the lazy dog",
        "hello world, hello specs",
        "numbers 12 345 6789",
    ]
    tokenizer.train_from_iterator(corpus * 50, trainer)
    return tokenizer


def permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half halves -> interleaved pairs."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def k_quant_blocks(rows: int, cols: int, qtype: str, seed: int = 0) -> np.ndarray:
    """Random K-quant bytes (gguf can read but not write these) with small, finite block scales."""
    kind = gguf.GGMLQuantizationType[qtype]
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, cols // block_values, block_bytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    if qtype in ("Q4_K", "Q5_K"):  # d and dmin lead the block
        data[..., 0:2] = scale
        data[..., 2:4] = scale
    else:  # Q6_K: d ends the block, after 16 signed sub-block scales
        data[..., -2:] = scale
    return data.reshape(rows, -1)


def write_gguf(
    path: Path,
    arch: str,
    config: dict,
    state: dict[str, torch.Tensor],
    qtype: str,
    tokenizer: Tokenizer,
    raw: dict[str, tuple[np.ndarray, str]] | None = None,
) -> None:
    """`raw`: tensors written as given bytes of a quantised type, replacing the model's values."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = (
        [" ".join(pair) for pair in tokenizer.model.get_merges()]
        if hasattr(tokenizer.model, "get_merges")
        else []
    )
    if not merges:
        import json

        merges = [
            m if isinstance(m, str) else " ".join(m)
            for m in json.loads(tokenizer.to_str())["model"]["merges"]
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
    writer.add_chat_template(CHAT_TEMPLATE)
    permuted = arch in ("llama", "mistral")
    for name, tensor in state.items():
        gguf_name = _gguf_name(name)
        if gguf_name is None:
            continue
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute(tensor, config["num_attention_heads"])
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute(tensor, config["num_key_value_heads"])
        data = tensor.detach().float().numpy()
        if raw and name in raw:
            blocks, kind = raw[name]
            writer.add_tensor(gguf_name, blocks, raw_dtype=gguf.GGMLQuantizationType[kind])
        elif data.ndim == 2 and qtype != "F32":
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_name(name: str) -> str | None:
    stem, _, suffix = name.rpartition(".")
    if stem == "model.embed_tokens":
        return f"token_embd.{suffix}"
    if stem == "model.norm":
        return f"output_norm.{suffix}"
    if stem == "lm_head":
        return f"output.{suffix}"
    parts = stem.split(".")
    if parts[:2] == ["model", "layers"]:
        mapped = LAYER_NAMES.get(".".join(parts[3:]))
        return f"blk.{parts[2]}.{mapped}.{suffix}" if mapped else None
    return None
