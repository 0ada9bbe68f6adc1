"""Every cache against the dynamic one on long greedy generations, and bounded memory where promised."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from specformer.generated.llama import LlamaForCausalLM
from specformer.generated.mistral import MistralForCausalLM
from specformer.runtime.cache import SinkCache, SlidingWindowCache
from specformer.runtime.generation import generate

SMALL = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2}
SMALL |= {"num_attention_heads": 4, "num_key_value_heads": 2}
NEW_TOKENS = 300


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> LlamaForCausalLM:
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    with torch.no_grad():  # a sharper model, so that generations are not all ties
        reference.lm_head.weight.mul_(40)
    reference.save_pretrained(folder)
    return LlamaForCausalLM.from_pretrained(folder)


def greedy(model: torch.nn.Module, **settings: object) -> torch.Tensor:
    prompt = torch.tensor([[5, 17, 42, 8, 23, 61, 7, 33]])
    return generate(model, prompt, max_new_tokens=NEW_TOKENS, eos_token_id=None, **settings)


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("static", None),
        ("offloaded", None),
        ("sink", {"window": 512, "sink": 4}),  # a window longer than the text: nothing is dropped
    ],
)
def test_exact_caches_match_the_dynamic_cache(
    llama: LlamaForCausalLM, name: str, config: dict | None
) -> None:
    expected = greedy(llama)
    assert greedy(llama, cache_implementation=name, cache_config=config).tolist() == expected.tolist()


@pytest.mark.parametrize("name", ["dynamic", "static"])
def test_a_float16_cache_stores_half_and_attends_in_the_models_dtype(
    llama: LlamaForCausalLM, name: str
) -> None:
    """`cache_config={"dtype": "float16"}`: keys and values stored in float16 (half of float32's bytes),
    read back as float32; the logits move by the keys' and values' rounding only."""
    from specformer.runtime.cache import DynamicCache, StaticCache

    ids = torch.tensor([[5, 17, 42, 9]])
    settings = {
        "max_new_tokens": 16,
        "eos_token_id": None,
        "return_dict_in_generate": True,
        "output_logits": True,
    }
    exact = generate(llama, ids, cache_implementation=name, **settings)
    half = generate(llama, ids, cache_implementation=name, cache_config={"dtype": "float16"}, **settings)
    cache = half.past_key_values
    stored = cache._keys if isinstance(cache, DynamicCache) else cache.keys
    assert all(k.dtype == torch.float16 for k in stored)
    for a, b in zip(half.logits, exact.logits, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-3)  # float16 keeps 11 significant bits
    for cache in (DynamicCache(torch.float16), StaticCache(8, torch.float16)):
        k = torch.randn(1, 2, 3, 8)
        keys, values = cache.update(0, k, k * 2)
        assert keys.dtype == values.dtype == torch.float32
        assert torch.equal(keys[..., :3, :], k.half().float()) and torch.equal(
            values[..., :3, :], (k * 2).half().float()
        )
    with pytest.raises(
        ValueError, match="cache_config dtype 'int8': expected one of bfloat16, float16, float32"
    ):
        generate(llama, ids, max_new_tokens=2, cache_config={"dtype": "int8"})
    with pytest.raises(ValueError, match="`sink` keeps its own"):
        generate(llama, ids, max_new_tokens=2, cache_implementation="sink", cache_config={"dtype": "float16"})


@pytest.mark.parametrize(("bits", "tolerance"), [(8, 0.01), (4, 0.2)])
def test_quantized_cache_stays_close_to_the_exact_one(bits: int, tolerance: float) -> None:
    """Keys and values come back within a quantisation step of what was stored; the recent ones exactly.
    (Token agreement on a real model is checked on SmolLM2 in test_gguf.py.)"""
    from specformer.runtime.cache import DynamicCache, QuantizedCache

    torch.manual_seed(0)
    quantized, exact = QuantizedCache(bits, residual=4), DynamicCache()
    for step in range(40):
        k = torch.randn(1, 2, 1 if step else 6, 8)
        v = torch.randn_like(k)
        (qk, qv), (ek, ev) = quantized.update(0, k, v), exact.update(0, k, v)
        assert qk.shape == ek.shape
        assert (qk - ek).abs().max() <= tolerance * ek.abs().max()
        assert torch.equal(qk[..., -4:, :], ek[..., -4:, :]) and torch.equal(qv[..., -1:, :], ev[..., -1:, :])
    assert quantized.quantized[0] and quantized.quantized[0][0][0].codes.dtype == torch.uint8


def test_four_bit_codes_take_half_the_bytes_of_eight_bit_ones() -> None:
    from specformer.runtime.cache import QuantizedCache

    caches = {bits: QuantizedCache(bits, residual=4) for bits in (4, 8)}
    torch.manual_seed(0)
    for _ in range(3):
        k = torch.randn(1, 2, 32, 64)
        for cache in caches.values():
            cache.update(0, k, k.clone())
    codes = {
        bits: sum(q.codes.numel() for chunk in c.quantized[0] for q in chunk) for bits, c in caches.items()
    }
    assert codes[4] * 2 == codes[8]  # the same tokens, two 4-bit codes a byte
    assert caches[4].quantized_bytes() < 0.6 * caches[8].quantized_bytes()


def test_sliding_window_cache_is_exact_for_a_sliding_model_and_bounded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=16))
    with torch.no_grad():
        reference.lm_head.weight.mul_(40)
    reference.save_pretrained(tmp_path)
    model = MistralForCausalLM.from_pretrained(tmp_path)
    expected = greedy(model)
    assert greedy(model, cache_implementation="sliding_window").tolist() == expected.tolist()
    cache = SlidingWindowCache(16)
    generate(model, torch.tensor([[5, 17, 42]]), max_new_tokens=100, eos_token_id=None, past_key_values=cache)
    assert all(k.shape[-2] <= 15 for k in cache.keys) and cache.get_seq_length() == 102


def test_sink_cache_bounds_memory(llama: LlamaForCausalLM) -> None:
    cache = SinkCache(window=32, sink=4)
    out = generate(
        llama, torch.tensor([[5, 17, 42]]), max_new_tokens=200, eos_token_id=None, past_key_values=cache
    )
    assert out.shape[1] == 203
    assert all(k.shape[-2] <= 32 for k in cache.keys)
    assert cache.get_seq_length() == 202


def test_unsuitable_cache_requests_are_explained(llama: LlamaForCausalLM) -> None:
    with pytest.raises(ValueError, match="no window on every layer"):
        greedy(llama, cache_implementation="sliding_window")
    with pytest.raises(ValueError, match="beam search reorders its cache"):
        greedy(llama, cache_implementation="static", num_beams=2)
    with pytest.raises(ValueError, match="cache_implementation `paged`: expected one of"):
        greedy(llama, cache_implementation="paged")


def test_compiled_static_decoding_is_traced_once(llama: LlamaForCausalLM) -> None:
    """A decode step compiled by torch.compile with a static cache compiles for the first token and is
    then replayed: no recompilation per token or per request of a similar length, and the tokens are the
    eager ones. (`compile=True` would take the fused CPU step instead: tests/test_fused_decode.py.)"""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    expected = generate(llama, torch.tensor([[5, 17, 42]]), max_new_tokens=16, eos_token_id=None)
    actual = generate(
        llama, torch.tensor([[5, 17, 42]]), max_new_tokens=16, eos_token_id=None, cache_implementation="static",
        compile="inductor",
    )  # fmt: skip
    assert actual.tolist() == expected.tolist()
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0
    # another request of a nearby length (same cache bucket) replays the same compiled step
    generate(
        llama, torch.tensor([[7, 3]]), max_new_tokens=40, eos_token_id=None, cache_implementation="static",
        compile="inductor",
    )  # fmt: skip
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0
    with pytest.raises(ValueError, match="compile=True needs fixed shapes"):
        generate(llama, torch.tensor([[5]]), max_new_tokens=2, compile=True)
    chosen = llama.attn_implementation
    llama.set_attention("flex_attention")
    try:
        with pytest.raises(ValueError, match=r"does not compile on the CPU.*attn_implementation='sdpa'"):
            generate(
                llama,
                torch.tensor([[5]]),
                max_new_tokens=2,
                cache_implementation="static",
                compile="inductor",
            )
    finally:
        llama.set_attention(chosen)
