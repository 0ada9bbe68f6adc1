"""Every family llama.cpp exports loads from GGUF: small transformers models written as llama.cpp's
converter writes them, read back by the generic loader (names from the gguf package, layouts from the
specs), compared with the model that was written and, where transformers reads that architecture from
GGUF, with transformers' own GGUF loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from gguf_files import bpe_tokenizer, k_quant_blocks, sentencepiece_vocab, write_gguf

from specformer.runtime.auto import load_causal_lm
from specformer.runtime.quantization import Int8Linear
from specformer.runtime.registry import gguf_architectures as architectures

BASE = {"vocab_size": 0, "max_position_embeddings": 64, "tie_word_embeddings": False}
DECODER = BASE | {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
# (GGUF architecture, transformers config class, config) chosen to exercise what the format stores:
# grouped-query attention, partial rotary, parallel residuals, q/k norms, biases, soft-caps, windows.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    # transformers reads no head size for Qwen3 from GGUF: its default (128) it is
    "qwen3": ("Qwen3Config", DECODER | {"hidden_size": 256, "num_attention_heads": 4, "head_dim": 128}),
    "gemma2": ("Gemma2Config", DECODER | {"head_dim": 32, "tie_word_embeddings": True, "sliding_window": 4}),
    # soft-caps that bite (transformers' GGUF reader keeps its defaults, 50 and 30; llama.cpp stores them)
    "gemma2-softcaps": (
        "Gemma2Config",
        DECODER
        | {
            "tie_word_embeddings": True,
            "sliding_window": 4,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    "gemma3": ("Gemma3TextConfig", DECODER | {"head_dim": 16, "num_hidden_layers": 3, "sliding_window": 4}),
    # a layer pattern and local rope base of its own (transformers' GGUF reader keeps the defaults)
    "gemma3-pattern": (
        "Gemma3TextConfig",
        DECODER
        | {
            "num_hidden_layers": 3,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
            },
        },
    ),
    "phi3": ("Phi3Config", DECODER | {"rms_norm_eps": 1e-5, "pad_token_id": 0}),
    "phi2": ("PhiConfig", DECODER | {"num_key_value_heads": 4, "partial_rotary_factor": 0.5}),
    # transformers reads GGUF's context length into `n_ctx`, not `n_positions`: its default (1024) it is
    "gpt2": (
        "GPT2Config",
        {
            "vocab_size": 0,
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 1024,
            "tie_word_embeddings": True,
        },
    ),
    "gptneox": (
        "GPTNeoXConfig",
        DECODER | {"num_key_value_heads": 4, "partial_rotary_factor": 0.25, "use_parallel_residual": False},
    ),
    "stablelm": (
        "StableLmConfig",
        DECODER | {"num_key_value_heads": 4, "use_qkv_bias": True, "use_parallel_residual": False},
    ),
    "stablelm-qk-norms": ("StableLmConfig", DECODER | {"num_key_value_heads": 4, "qk_layernorm": True}),
    "olmo2": ("Olmo2Config", DECODER),
    "gemma": ("GemmaConfig", DECODER | {"head_dim": 16, "tie_word_embeddings": True}),
    # mixtures of experts: llama.cpp's (E, out, in) expert tensors, gate and up apart, stacked on load;
    # transformers reads no expert sizes from GGUF: its defaults (1408 and 5632; 768) they are
    "qwen2moe": ("Qwen2MoeConfig", DECODER | {"num_experts": 4, "num_experts_per_tok": 2}),
    "qwen3moe": ("Qwen3MoeConfig", DECODER | {"num_experts": 4, "num_experts_per_tok": 2}),
    "olmoe": ("OlmoeConfig", DECODER | {"num_experts": 4, "num_experts_per_tok": 2}),
    # a `llama` file with expert tensors: the file's tensors choose Mixtral's spec over Llama's
    "llama-mixtral": ("MixtralConfig", DECODER | {"num_local_experts": 4, "num_experts_per_tok": 2}),
}
# Architectures transformers itself reads from GGUF (its GGUF_SUPPORTED_ARCHITECTURES).
# (qwen3moe too, but its outputs there differ from the source model's by ~0.1)
TRANSFORMERS_READS = ("qwen3", "gemma2", "gemma3", "phi3", "gpt2", "stablelm", "qwen2moe")


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(300)


def source_model(arch: str, vocab_size: int) -> transformers.PreTrainedModel:
    config_class, values = FAMILIES[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**(values | {"vocab_size": vocab_size}))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms away from their initial ones, so a missed offset shows
        for name, parameter in model.named_parameters():
            if "norm" in name or "ln_" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def test_every_family_declares_its_architecture() -> None:
    assert {name.partition("-")[0] for name in FAMILIES} | {"llama", "qwen2"} <= set(architectures())


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_family_loads_from_gguf(arch: str, tokenizer, tmp_path: Path) -> None:
    source = source_model(arch, tokenizer.get_vocab_size())
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, arch.partition("-")[0], source, "F32", tokenizer)

    model, ours_tokenizer = load_causal_lm(path)
    assert type(model).config_class.model_type == source.config.model_type
    ids = torch.tensor([ours_tokenizer.encode("hello world, the quick brown fox 12345 jumps")])
    with torch.no_grad():
        expected = source(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)
        if arch in TRANSFORMERS_READS:
            reference = transformers.AutoModelForCausalLM.from_pretrained(
                tmp_path, gguf_file=path.name
            ).eval()
            torch.testing.assert_close(reference(ids).logits, expected, atol=1e-5, rtol=0)
    for name in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size"):
        if hasattr(model.config, name):  # the sizes the file carries, as the source has them
            assert getattr(model.config, name) == getattr(source.config, name), name


@pytest.mark.parametrize(("arch", "qtype"), [("gptneox", "Q8_0"), ("gemma2", "Q4_0"), ("stablelm", "Q4_1")])
def test_packed_blocks_keep_the_family_layouts(arch: str, qtype: str, tokenizer, tmp_path: Path) -> None:
    """Kept packed, reordered rows (GPT-NeoX's fused ones) move as whole blocks: the same numbers as
    the dequantised load (float activations)."""
    from specformer.runtime.quantization import Int4Linear, Int8Linear

    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, arch, source_model(arch, tokenizer.get_vocab_size()), qtype, tokenizer)
    dense = load_causal_lm(path, dequantize=True)[0]
    packed = type(dense).from_gguf(path, activations="float")
    assert any(isinstance(m, Int8Linear | Int4Linear) for m in packed.modules())
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, dense(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("arch", "qtype"),
    [("qwen2moe", "Q8_0"), ("qwen3moe", "Q4_0"), ("llama-mixtral", "Q4_1"), ("olmoe", "Q8_0")],
)
def test_quantized_expert_stacks_stay_packed(arch: str, qtype: str, tokenizer, tmp_path: Path) -> None:
    """A quantized file's expert stacks load as each expert's packed layers (no float copy of the
    largest tensors); the router keeps its float weight. Tokens route as before: the dequantised load's
    numbers (float activations) and greedy tokens."""
    from specformer.runtime.moe import Router
    from specformer.runtime.quantization import Int4Linear, Int8Linear, PackedExperts

    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, arch.partition("-")[0], source_model(arch, tokenizer.get_vocab_size()), qtype, tokenizer)
    dense = load_causal_lm(path, dequantize=True)[0]
    packed = type(dense).from_gguf(path, activations="float")
    mlp = packed.model.layers[0].mlp
    assert isinstance(mlp.experts, PackedExperts) and type(mlp.gate) is Router
    kind = Int8Linear if qtype == "Q8_0" else Int4Linear
    assert all(
        isinstance(m, kind) for stack in (mlp.experts.gate, mlp.experts.up, mlp.experts.down) for m in stack
    )
    assert packed.get_memory_footprint() < 0.4 * dense.get_memory_footprint()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, dense(ids).logits, atol=1e-5, rtol=0)
    settings = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None}
    assert packed.generate(ids, **settings).tolist() == dense.generate(ids, **settings).tolist()


@pytest.mark.parametrize("kind", ["Q5_1", "Q2_K", "Q3_K"])
def test_other_block_types_dequantise_as_transformers_does(kind: str, tokenizer, tmp_path: Path) -> None:
    """The types Q4_K_M / Q5_K_M files mix in besides Q4_K/Q5_K/Q6_K and Q5_0: Q5_1 loads packed (int8
    groups of 32 with offsets), Q2_K and Q3_K dequantised."""
    source = source_model("qwen3", tokenizer.get_vocab_size())
    source.config.intermediate_size = 256
    source = transformers.Qwen3ForCausalLM(source.config).eval()
    raw = {}
    if kind.endswith("_K"):
        raw = {
            "model.layers.0.mlp.down_proj.weight": (
                k_quant_blocks(source.config.hidden_size, 256, kind),
                kind,
            )
        }
    path = tmp_path / "mixed.gguf"
    write_gguf(path, "qwen3", source, "F32" if raw else kind, tokenizer, raw)
    model = load_causal_lm(path, activations="float")[0]
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, Int8Linear) == (kind == "Q5_1") and (kind != "Q5_1" or layer.offsets is not None)
    weight = layer.dequantize() if isinstance(layer, Int8Linear) else layer.weight
    torch.testing.assert_close(weight, reference.model.layers[0].mlp.down_proj.weight, atol=0, rtol=0)
    assert torch.isfinite(weight).all() and weight.abs().max() > 0
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
    if kind == "Q5_1":  # int8 with offsets saves and reloads as such, exactly
        model.save_pretrained(tmp_path / "saved")
        reloaded = type(model).from_pretrained(tmp_path / "saved")
        assert reloaded.model.layers[0].mlp.down_proj.offsets is not None
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_sentencepiece_vocabulary_matches_transformers(tmp_path: Path) -> None:
    """A Llama-2-style file: SentencePiece pieces with scores and byte tokens, no merges."""
    vocab = sentencepiece_vocab()
    source = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**(DECODER | {"vocab_size": len(vocab)}))
    ).eval()
    path = tmp_path / "spm.gguf"
    write_gguf(path, "llama", source, "Q8_0", vocab)
    model, ours = load_causal_lm(path, activations="float")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in [
        "hello world, the quick brown fox",
        "  leading spaces and ünïcödé 🦊 bytes",
        "<|im_start|>user\nhi<|im_end|> <think>",
        "numbers 12 345 6789\n\ttabs",
    ]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids), text
    ids = torch.tensor([ours.encode("hello world")])
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_fused_qkv_of_older_converters_splits_into_the_projections(tokenizer, tmp_path: Path) -> None:
    """Phi-2 files from the original checkpoint format carry one `attn_qkv`; the spec has q, k and v."""
    import gguf

    source = source_model("phi2", tokenizer.get_vocab_size())
    write_gguf(tmp_path / "split.gguf", "phi2", source, "F32", tokenizer)
    reader = gguf.GGUFReader(tmp_path / "split.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "fused.gguf"), "phi2")
    for key, entry in reader.fields.items():
        if not key.startswith(("GGUF.", "general.architecture")):
            value = entry.contents()
            kind = entry.types[0]
            sub = entry.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, value, kind, sub_type=sub)
    tensors = {t.name: t.data for t in reader.tensors}
    for name in list(tensors):
        if ".attn_q." in name:
            parts = [tensors.pop(name.replace("attn_q", p)) for p in ("attn_q", "attn_k", "attn_v")]
            tensors[name.replace("attn_q", "attn_qkv")] = np.concatenate(parts)
    for name, data in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = load_causal_lm(tmp_path / "fused.gguf")[0]
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=1e-5, rtol=0)
