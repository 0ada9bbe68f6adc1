"""bitsandbytes 8-bit and 4-bit (nf4, fp4, double quant) on load, on the CPU; save and reload.

Documented: SmolLM2 greedy decoding in 8-bit agrees with fp32 on at least 28 of 32 tokens.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from test_quantization import logits, small_llama

from specformer.generated.llama import LlamaForCausalLM

bnb = pytest.importorskip("bitsandbytes")
from specformer.runtime.layers import Linear  # noqa: E402
from specformer.runtime.quantization import BitsAndBytesConfig  # noqa: E402

CONFIGS = {
    "int8": BitsAndBytesConfig(load_in_8bit=True),
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-double": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    ),
}


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="MatMul8bitLt")
        yield


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_load_run_save_reload(name: str, tmp_path: Path) -> None:
    config = CONFIGS[name]
    model = small_llama()
    model.save_pretrained(tmp_path / "fp32")
    expected = logits(model)
    quantized = LlamaForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=config)
    layer = quantized.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt if config.load_in_8bit else bnb.nn.Linear4bit)
    assert type(quantized.lm_head) is Linear
    assert (logits(quantized) - expected).abs().max() / expected.abs().max() < 0.3
    assert quantized.get_memory_footprint() < 0.6 * model.get_memory_footprint()

    before = logits(quantized)
    quantized.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "bitsandbytes"
    assert (
        saved["load_in_4bit"] == config.load_in_4bit
        and saved["bnb_4bit_quant_type"] == config.bnb_4bit_quant_type
    )
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "q")
    assert set(reloaded.state_dict()) == set(quantized.state_dict())
    torch.testing.assert_close(logits(quantized), before, atol=0, rtol=0)  # saving changed nothing
    torch.testing.assert_close(logits(reloaded), before, atol=0, rtol=0)
    again = tmp_path / "again"
    reloaded.save_pretrained(again)
    assert (again / "model.safetensors").read_bytes() == (tmp_path / "q" / "model.safetensors").read_bytes()


def test_skip_modules_and_bad_settings(tmp_path: Path) -> None:
    small_llama().save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["o_proj", "down_proj"])
    model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=config)
    assert type(model.model.layers[1].self_attn.o_proj) is Linear
    assert type(model.model.layers[1].mlp.down_proj) is Linear
    assert isinstance(model.model.layers[1].mlp.up_proj, bnb.nn.Linear8bitLt)
    with pytest.raises(ValueError, match="exactly one of load_in_8bit and load_in_4bit"):
        BitsAndBytesConfig()
    with pytest.raises(ValueError, match="bnb_4bit_quant_type='int3'"):
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="int3")
    assert (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16).compute_dtype
        == torch.bfloat16
    )


def test_smollm2_in_8bit_follows_fp32() -> None:
    from specformer.runtime.auto import default_model_path, load_causal_lm
    from specformer.runtime.generation import generate
    from specformer.runtime.quantization import quantize

    try:
        path = default_model_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    dense, tokenizer = load_causal_lm(path)
    messages = [
        {"role": "user", "content": "Name three primary colours and say what mixing two of them gives."}
    ]
    ids = torch.tensor([tokenizer.apply_chat_template(messages, add_generation_prompt=True)])
    expected = generate(dense, ids, max_new_tokens=32, eos_token_id=None)[0, ids.shape[1] :]
    eight_bit = quantize(dense, BitsAndBytesConfig(load_in_8bit=True))
    got = generate(eight_bit, ids, max_new_tokens=32, eos_token_id=None)[0, ids.shape[1] :]
    assert int((got == expected).sum()) >= 28, (
        tokenizer.decode(got.tolist()),
        tokenizer.decode(expected.tolist()),
    )
