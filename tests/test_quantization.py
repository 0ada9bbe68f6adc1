"""Weight-only int8/int4 quantization: layer math, load-time quantization, save/reload, GGUF blocks.

Documented tolerances (max |logit difference| over max |logit| of the fp32 model, random small Llama):
int8 per channel <= 2 %, int4 groups of 32 <= 15 %. Quantized layers reload bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specformer.generated.llama import LlamaConfig, LlamaForCausalLM
from specformer.runtime.layers import Linear
from specformer.runtime.quantization import (
    Int4Linear,
    Int8Linear,
    PackedEmbedding,
    WeightOnlyConfig,
    quantize,
)

TOLERANCE = {8: 0.02, 4: 0.15}


def small_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


IDS = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(3))


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    ("kind", "group", "options"),
    [
        (Int8Linear, None, {}),
        (Int8Linear, 16, {}),
        (Int4Linear, 16, {}),
        (Int4Linear, 32, {}),
        (Int4Linear, 32, {"symmetric": True}),
    ],
)
def test_layers_approximate_the_float_layer(kind: type, group: int | None, options: dict) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 24, bias=True)
    layer = kind.from_linear(linear, group, **options) if group else kind.from_linear(linear)
    x = torch.randn(3, 5, 64)
    dense = torch.nn.functional.linear(x, layer.dequantize(), linear.bias)
    torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=0)
    error = (layer(x) - linear(x)).abs().max() / linear(x).abs().max()
    assert error < (0.02 if kind is Int8Linear else 0.15)


def test_compiled_matvec_form_matches_the_dequantised_form() -> None:
    """Decoding under torch.compile takes the fused multiply-and-sum path; it must compute the same."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 24, bias=True)
    for layer in (Int8Linear.from_linear(linear, 16), Int4Linear.from_linear(linear, 16)):
        x = torch.randn(1, 1, 64)
        compiled = torch.compile(layer, fullgraph=True, dynamic=False)
        torch.testing.assert_close(compiled(x), layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("bits", "symmetric"), [(8, False), (4, False), (4, True)])
def test_quantized_on_load_saves_and_reloads_exactly(bits: int, symmetric: bool, tmp_path: Path) -> None:
    model = small_llama()
    model.save_pretrained(tmp_path / "fp32")
    expected = logits(model)
    quantized = LlamaForCausalLM.from_pretrained(
        tmp_path / "fp32", quantization_config=WeightOnlyConfig(bits=bits, symmetric=symmetric)
    )
    kind = Int8Linear if bits == 8 else Int4Linear
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, kind)
    assert type(quantized.lm_head) is Linear  # heads stay full precision by default
    got = logits(quantized)
    assert (got - expected).abs().max() / expected.abs().max() < TOLERANCE[bits]
    assert quantized.get_memory_footprint() < model.get_memory_footprint()

    quantized.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "weight_only" and saved["bits"] == bits
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "q")
    assert set(reloaded.state_dict()) == set(quantized.state_dict())
    # a symmetric int4 layer stores no offsets (Q4_0's (q - 8) * scale)
    assert any(key.endswith(".offsets") for key in reloaded.state_dict()) == (bits == 4 and not symmetric)
    torch.testing.assert_close(logits(reloaded), got, atol=0, rtol=0)


def test_a_tied_head_can_be_quantized_on_request(tmp_path: Path) -> None:
    model = small_llama(tie=True)
    quantize(model, WeightOnlyConfig(bits=8, group_size=16, modules_to_convert=["lm_head"]))
    assert isinstance(model.lm_head, Int8Linear)
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the lookup keeps its float table
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded.lm_head, Int8Linear)
    torch.testing.assert_close(logits(reloaded), logits(model), atol=0, rtol=0)


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="bits=3; expected 8 or 4"):
        WeightOnlyConfig(bits=3)
    with pytest.raises(ValueError, match="group_size=48 does not divide in_features=64"):
        quantize(small_llama(), WeightOnlyConfig(bits=4, group_size=48))
    with pytest.raises(ValueError, match="quant_method `awq` is unknown"):
        quantize(small_llama(), {"quant_method": "awq"})


def test_gguf_q4_blocks_load_as_int4_without_a_float_copy() -> None:
    from specformer.runtime.auto import default_model_path
    from specformer.runtime.generation import generate

    try:
        path = default_model_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    dense = LlamaForCausalLM.from_gguf(path, dequantize=True)
    packed = LlamaForCausalLM.from_gguf(path, activations="float")
    assert isinstance(packed.model.layers[0].mlp.up_proj, Int4Linear)  # the file's Q4_1 blocks
    # the tied output projection keeps the file's Q8_0 token_embd blocks, and the embedding looks its
    # rows up there (dequantised as looked up: the dense model's rows exactly), so no float table exists
    assert isinstance(packed.lm_head, Int8Linear) and isinstance(packed.model.embed_tokens, PackedEmbedding)
    assert packed.model.embed_tokens.table is packed.lm_head
    assert packed.get_input_embeddings() is packed.model.embed_tokens
    # 1.1 bytes a weight for the table and about 0.7 (Q4_1 with float16 scale and minimum) for the rest
    assert packed.get_memory_footprint() < 0.2 * dense.get_memory_footprint()
    ids = torch.tensor([[1, 504, 3458, 282, 4114, 314, 9876, 288]])
    assert torch.equal(packed.model.embed_tokens(ids), dense.model.embed_tokens(ids))
    # the packed kernels add each row's products in another order (two chains of groups): float32
    # rounding over ~1500-term sums, on logits of magnitude ~20
    torch.testing.assert_close(logits(packed, ids), logits(dense, ids), atol=5e-4, rtol=1e-5)
    expected = generate(dense, ids, max_new_tokens=16, eos_token_id=None)
    assert generate(packed, ids, max_new_tokens=16, eos_token_id=None).tolist() == expected.tolist()
