"""The fused CPU decode step (runtime/fused_decode.py): the model's own numbers, and only where it applies."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from specformer.codegen import render_model
from specformer.dsl import SpecSet
from specformer.generated.gemma import GemmaConfig, GemmaForCausalLM
from specformer.generated.llama import LlamaConfig, LlamaForCausalLM
from specformer.generated.mistral import MistralConfig, MistralForCausalLM
from specformer.generated.mixtral import MixtralConfig, MixtralForCausalLM
from specformer.generated.qwen2 import Qwen2Config, Qwen2ForCausalLM
from specformer.runtime import AutoModelForCausalLM, cpu_kernels
from specformer.runtime.cache import StaticCache
from specformer.runtime.fused_decode import FusedDecoder, decoder_paths
from specformer.runtime.generation import compiled_step, generate

pytestmark = pytest.mark.skipif(cpu_kernels.ops() is None, reason="no C++ compiler to build the kernels")
SPECS = Path(__file__).resolve().parents[1] / "specs"
ARCHITECTURES = {
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    # rotary tables that depend on the sequence's length (the step computes each step's own)
    "llama_dynamic_rope": (
        LlamaForCausalLM,
        LlamaConfig,
        {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 10},
    ),
    "mistral": (MistralForCausalLM, MistralConfig, {"sliding_window": 7}),
    # q/k/v biases, and windows on the upper layers only
    "qwen2": (
        Qwen2ForCausalLM,
        Qwen2Config,
        {"use_sliding_window": True, "sliding_window": 7, "max_window_layers": 1},
    ),
    "gemma": (GemmaForCausalLM, GemmaConfig, {}),  # (1 + w) norms, scaled embeddings, GeGLU
    # each token's top 2 of 4 experts, and windows
    "mixtral": (MixtralForCausalLM, MixtralConfig, {"num_local_experts": 4, "sliding_window": 7}),
}


@torch.inference_mode()  # as generate() runs: the kernels stand in for torch's ops without gradients
def step_for(model: torch.nn.Module, cache: object, rows: int = 1, how: bool | str = True) -> object:
    return compiled_step(model, cache, torch.zeros(rows, 3, dtype=torch.long), how)


def decode(model: torch.nn.Module, prompt: torch.Tensor, mask: torch.Tensor, **settings: object) -> object:
    settings = {"cache_implementation": "static", **settings}
    return generate(model, prompt, mask, max_new_tokens=12, eos_token_id=None, return_dict_in_generate=True,
                    output_logits=True, **settings)  # fmt: skip


def assert_fused_decodes_as_op_by_op(
    model: torch.nn.Module, prompt: torch.Tensor, mask: torch.Tensor, tolerance: float, **settings: object
) -> None:
    """Same tokens, and logits to `tolerance`, as the model's own forward step by step."""
    with mock.patch("specformer.runtime.generation.fused_decoder", return_value=None):  # op by op
        expected = decode(model, prompt, mask, **settings)
    with mock.patch("specformer.runtime.fused_decode.FusedDecoder.__call__", autospec=True,
                    side_effect=FusedDecoder.__call__) as fused_steps:  # fmt: skip
        actual = decode(model, prompt, mask, **settings)
    assert fused_steps.call_count == len(actual.logits) - 1  # every step after the prompt's
    for a, b in zip(expected.logits, actual.logits, strict=True):
        torch.testing.assert_close(b, a, atol=tolerance, rtol=tolerance)
    assert actual.sequences.tolist() == expected.sequences.tolist()


@given(
    arch=st.sampled_from(sorted(ARCHITECTURES)),
    head_dim=st.sampled_from([8, 64, 128]),  # 64 and 128 take the AVX-512 attention loops
    groups=st.sampled_from([(2, 2), (4, 2), (6, 3), (3, 1)]),  # (heads, kv heads)
    layers=st.integers(1, 3),
    batch=st.sampled_from([1, 2, 5]),  # 5: the GEMV's four-row tiles and a row left over
    cache=st.sampled_from(["static", "dynamic"]),
    seed=st.integers(0, 99),
)
def test_fused_steps_give_the_models_logits(
    arch: str, head_dim: int, groups: tuple[int, int], layers: int, batch: int, cache: str, seed: int
) -> None:
    """Random small configs, left-padded batches, windows shorter than the generation, static and dynamic
    caches: the fused step's logits are the op-by-op step's to float rounding, and so are the tokens."""
    cls, config_cls, extra = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    heads, kv_heads = groups
    config = config_cls(vocab_size=61, hidden_size=heads * head_dim // 2, intermediate_size=44, head_dim=head_dim,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, **extra)  # fmt: skip
    model = cls(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # sharper logits: fewer near-ties between tokens
        for name, parameter in model.named_parameters():
            if "norm" in name:  # norms start as ones (or zeros, Gemma's): make each one count
                parameter.add_(torch.randn_like(parameter) * 0.3)
    prompt = torch.randint(0, 61, (batch, 6))
    mask = torch.ones_like(prompt)
    mask[1:, :3] = 0
    assert isinstance(step_for(model, StaticCache(32), batch), FusedDecoder)
    assert_fused_decodes_as_op_by_op(model, prompt, mask, 1e-5, cache_implementation=cache)


@pytest.mark.parametrize(("experts", "top_k", "normalize"), [(4, 1, True), (8, 2, False), (3, 3, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixtures_of_experts_decode_fused(
    experts: int, top_k: int, normalize: bool, dtype: torch.dtype
) -> None:
    """A Mixtral-style decoder (router and stacked experts in place of the gated MLP) decodes through the
    fused step: each row's experts chosen as the Router chooses them, only theirs read, their outputs
    summed as Experts sums them. Collecting router logits, or experts split over ranks, decode op by op."""
    torch.manual_seed(top_k)
    config = MixtralConfig(vocab_size=61, hidden_size=64, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                           num_experts_per_tok=top_k)  # fmt: skip
    model = MixtralForCausalLM(config).eval().to(dtype)
    for layer in model.model.layers:
        layer.mlp.gate.normalize = normalize
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # sharper logits: fewer near-ties between tokens
    prompt = torch.randint(0, 61, (2, 5))
    fused = step_for(model, StaticCache(32), 2)
    assert isinstance(fused, FusedDecoder) and (fused.top_k, fused.normalize_top_k) == (top_k, normalize)
    assert_fused_decodes_as_op_by_op(
        model, prompt, torch.ones_like(prompt), 1e-5 if dtype == torch.float32 else 1e-2
    )
    model.model.layers[0].mlp.gate.recorded = []  # output_router_logits collecting
    assert not isinstance(step_for(model, StaticCache(32)), FusedDecoder)
    model.model.layers[0].mlp.gate.recorded = None
    model.model.layers[1].mlp.experts.keep_experts(0, 1, None)  # this rank's experts only
    assert not isinstance(step_for(model, StaticCache(32)), FusedDecoder)


def test_a_growing_cache_is_followed() -> None:
    """The step's plan checks the model once and keeps its pointers while the caches keep their storage;
    a dynamic cache that grows mid-generation (64 slots, then 128) moves them, and the plan follows."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, 61, (1, 58))
    assert_fused_decodes_as_op_by_op(
        model, prompt, torch.ones_like(prompt), 1e-5, cache_implementation="dynamic"
    )


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stored", ["float16", "bfloat16", "float32"])
def test_caches_in_another_dtype_decode_fused(cache: str, dtype: torch.dtype, stored: str) -> None:
    """A KV cache in another dtype (`cache_config={"dtype": "float16"}`, as llama.cpp keeps its own): the
    step writes each key and value rounded to it, as the cache's update rounds them, and attends over them
    in float32, as the op-by-op model does after reading them back: the same logits to float rounding,
    left padding and windows too."""
    torch.manual_seed(3)
    config = MistralConfig(vocab_size=61, hidden_size=64, intermediate_size=44, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=5)  # fmt: skip
    model = MistralForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    prompt = torch.randint(0, 61, (2, 6))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert_fused_decodes_as_op_by_op(
        model, prompt, mask, tolerance, cache_implementation=cache, cache_config={"dtype": stored}
    )


def test_bfloat16_rounds_where_the_model_does() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=61, hidden_size=128, intermediate_size=200, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    prompt = torch.randint(0, 61, (2, 5))
    assert_fused_decodes_as_op_by_op(model, prompt, torch.ones_like(prompt), 1e-2, compile=True)


def test_only_specs_with_the_fused_dataflow_get_a_decoder_layout() -> None:
    assert all(decoder_paths(cls) is not None for cls, _, _ in ARCHITECTURES.values())
    specs = SpecSet()
    specs.add_file(SPECS / "llama.sf", "llama.sf")
    llama = (SPECS / "llama.sf").read_text()
    variants = {
        "renamed": (llama.replace("input_layernorm", "ln_1").replace("self_attn", "attn").replace("gate_proj", "w1"), True),
        "scaled": (llama.replace("causal = true,", "causal = true, scale = 0.5,"), False),
        "post-norm": (llama.replace("x = x + self_attn(input_layernorm(x))", "x = input_layernorm(x + self_attn(x))"), False),
        "ungated": (llama.replace("hidden_act(gate_proj(x)) * up_proj(x)", "hidden_act(up_proj(x))"), False),
    }  # fmt: skip
    for name, (text, fused) in variants.items():
        specs = SpecSet()
        specs.add_text(
            text.replace("model Llama", "model Variant").replace('"llama"', '"variant"'), "variant.sf"
        )
        files = render_model(specs.resolved("Variant"))
        assert ("register_decoder(" in files["variant/__init__.py"]) == fused, name
        assert "fused_decode" not in files["variant/modeling_variant.py"], name  # no fast path in modeling


def test_families_outside_the_fused_dataflow_fall_back_to_their_forward() -> None:
    """Per-head or per-projection q/k norms (Qwen3, OLMo 2), LayerNorm and fused projections (GPT-NeoX)
    and parallel attention/MLP from one LayerNorm (Phi, StableLM) fused qkv/gate-up projections (Phi-3) learned positions (GPT-2) and soft-capped scores (Gemma 2) are not in the fused step: those packages register
    no decoder and generate() runs their forward."""
    import specformer.generated.gemma2 as gemma2
    import specformer.generated.gemma3_text as gemma3_text
    import specformer.generated.gpt2 as gpt2
    import specformer.generated.gpt_neox as gpt_neox
    import specformer.generated.olmo2 as olmo2
    import specformer.generated.phi as phi
    import specformer.generated.phi3 as phi3
    import specformer.generated.qwen3 as qwen3
    import specformer.generated.stablelm as stablelm

    for package in (qwen3, olmo2, gpt_neox, gpt2, phi, phi3, stablelm, gemma2, gemma3_text):
        model_class = next(
            getattr(package, n) for n in package.__all__ if n.endswith(("ForCausalLM", "LMHeadModel"))
        )
        assert decoder_paths(model_class) is None
        config = model_class.config_class(vocab_size=61, hidden_size=32, intermediate_size=40,
                                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                          pad_token_id=0)  # fmt: skip
        model = model_class(config).eval()
        assert not isinstance(step_for(model, StaticCache(32)), FusedDecoder)


def test_a_spec_written_with_other_names_decodes_fused(tmp_path: Path) -> None:
    """The match is on dataflow, not on Llama's names: a user's spec with its own gets the fused step."""
    text = (SPECS / "llama.sf").read_text()
    for old, new in [("model Llama", "model Renamed"), ('"llama"', '"renamed"'), ("input_layernorm", "ln_1"),
                     ("post_attention_layernorm", "ln_2"), ("self_attn", "attn"), ("gate_proj", "w1")]:  # fmt: skip
        text = text.replace(old, new)
    (tmp_path / "renamed.sf").write_text(text)
    config = {"vocab_size": 61, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    model = AutoModelForCausalLM.from_spec(tmp_path / "renamed.sf", config).eval()
    prompt = torch.randint(0, 61, (1, 4))
    assert isinstance(step_for(model, StaticCache(32)), FusedDecoder)
    assert_fused_decodes_as_op_by_op(model, prompt, torch.ones_like(prompt), 1e-5)


def test_what_the_fused_step_does_not_cover_decodes_op_by_op() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    cache = StaticCache(32)
    assert isinstance(step_for(model, cache), FusedDecoder)
    assert not isinstance(step_for(model, cache, rows=17), FusedDecoder)  # more rows than the GEMV takes
    assert not isinstance(step_for(model, cache, how="inductor"), FusedDecoder)
    with pytest.raises(ValueError, match="needs fixed shapes"):  # the step writes into preallocated slots
        step_for(model, None)
    gelu = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "hidden_act": "gelu"})).eval()
    assert not isinstance(step_for(gelu, cache), FusedDecoder)
    wrapped = LlamaForCausalLM(config).eval()

    class Adapted(
        torch.nn.Linear
    ):  # LoRA, quantized or sharded layers: not the plain Linear the kernel reads
        pass

    wrapped.model.layers[1].mlp.up_proj = Adapted(32, 40, bias=False)
    assert not isinstance(step_for(wrapped, cache), FusedDecoder)
    seen: list[torch.Size] = []
    hook = model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert not isinstance(step_for(model, cache), FusedDecoder)  # a hook must see every step
    generate(model, torch.tensor([[3, 4]]), max_new_tokens=3, eos_token_id=None)
    assert len(seen) == 3
    hook.remove()
    with pytest.raises(ValueError, match="expected True, False or 'inductor'"):
        step_for(model, cache, how="fast")


def test_bad_input_names_what_does_not_fit() -> None:
    model = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()  # fmt: skip
    assert isinstance(step_for(model, StaticCache(8)), FusedDecoder)
    good_keys, bad_keys = [torch.zeros(1, 2, 8, 8)], [torch.zeros(2, 2, 8, 8)]  # two rows of cache for one

    def step(
        keys: list[torch.Tensor],
        layers: list[dict],
        activation: str = "silu",
        token: int = 0,
        position: int = 0,
        mask_slots: int = 8,
    ) -> None:
        plan = torch.classes.specformer_cpu.DecodePlan(
            layers,
            step_.layout.norm.weight,
            step_.layout.head.weight,
            {},
            step_.layout.embed.weight,
            {},
            None,
            [0],
            1e-6,
            0.35,
            False,
            activation,
            False,
            0,
            False,
        )
        plan.step(
            torch.tensor([[token]]), torch.tensor([[position]]), torch.ones(1, mask_slots, dtype=torch.long), keys,
            keys, torch.zeros(8, 8), torch.zeros(8, 8), 0,
        )  # fmt: skip

    step_ = step_for(model, StaticCache(8))
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="layer 0 cache has shape"):
            step(bad_keys, step_.layers)
        with pytest.raises(
            RuntimeError, match=r"layer 0's v weight has shape \[16, 30\]; expected \(16, 32\)"
        ):
            step(good_keys, [{**step_.layers[0], "v": torch.zeros(16, 30)}])
        with pytest.raises(RuntimeError, match="layer 0 has no `gate` weight"):
            step(good_keys, [{k: v for k, v in step_.layers[0].items() if k != "gate"}])
        with pytest.raises(RuntimeError, match="layer 0 has an unknown tensor `q_bais`"):
            step(good_keys, [{**step_.layers[0], "q_bais": torch.zeros(32)}])
        packed_q = torch.zeros(32, 32, dtype=torch.int8)
        with pytest.raises(RuntimeError, match="layer 0's packed q has no `q_scales`"):
            step(good_keys, [{**step_.layers[0], "q": packed_q}])
        with pytest.raises(RuntimeError, match=r"q_scales must be float32 or float16 \(32, groups\)"):
            step(good_keys, [{**step_.layers[0], "q": packed_q, "q_scales": torch.zeros(31, 1)}])
        with pytest.raises(RuntimeError, match="q_offsets must be shaped and typed like its scales"):
            step(
                good_keys,
                [
                    {
                        **step_.layers[0],
                        "q": torch.zeros(32, 16, dtype=torch.uint8),
                        "q_scales": torch.zeros(32, 1),
                        "q_offsets": torch.zeros(32, 1, dtype=torch.float16),
                    }
                ],
            )
        with pytest.raises(RuntimeError, match="activation `relu`; expected silu or gelu_tanh"):
            step(good_keys, step_.layers, "relu")
        with pytest.raises(
            RuntimeError, match=r"row 0's token id is 61; expected 0 to 60 \(the embedding's rows\)"
        ):
            step(good_keys, step_.layers, token=61)
        with pytest.raises(
            RuntimeError, match=r"row 0's position is 8; expected 0 to 7 \(the rotary tables' rows\)"
        ):
            step(good_keys, step_.layers, position=8)
        with pytest.raises(
            RuntimeError,
            match="attention_mask must have 1 row and a column for each of the cache's first 1 slots",
        ):
            step(good_keys, step_.layers, mask_slots=0)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activations", ["float", "int8"])
@pytest.mark.parametrize("as_in_files", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_packed_weights_decode_fused(
    bits: int, dtype: torch.dtype, activations: str, as_in_files: bool, batch: int
) -> None:
    """Weight-only int8/int4 layers (GGUF's Q8_0 and Q4 blocks), the output projection packed too: the
    fused step reads the blocks and gives the op-by-op model's tokens and logits, in either arithmetic
    (the down projection's 160 inputs are a group of four blocks and a tail of one). `as_in_files`:
    float16 scales and symmetric int4 (Q8_0's and Q4_0's blocks), and int8 up projections with offsets
    (Q5_1's 5-bit values and minimums); one sequence reads short int4 rows four at a time."""
    from specformer.runtime.quantization import Int4Linear, Int8Linear, WeightOnlyConfig, quantize

    torch.manual_seed(bits)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config).to(dtype).eval()
    settings = WeightOnlyConfig(
        bits, 32, modules_to_convert=["lm_head"], activations=activations, symmetric=as_in_files
    )
    quantize(model, settings)
    kind = Int8Linear if bits == 8 else Int4Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, kind) and isinstance(model.lm_head, kind)
    for layer in (m for m in model.modules() if as_in_files and isinstance(m, kind)):
        layer.scales.data = layer.scales.half()
    for block in model.model.layers if as_in_files and bits == 8 else []:
        old = block.mlp.up_proj
        up = Int8Linear(64, 160, 32, False, dtype, activations=activations, symmetric=False)
        up.weight.data = torch.randint(0, 32, up.weight.shape, dtype=torch.int8)
        up.scales.data = old.scales.data
        up.offsets.data = (old.scales.float() * (torch.rand(old.scales.shape) - 16)).half()
        block.mlp.up_proj = up
    prompt = torch.randint(0, 96, (batch, 5))
    fused = step_for(model, StaticCache(32))
    assert isinstance(fused, FusedDecoder) and fused.int8_activations == (activations == "int8")
    # Rounding to int8 is a step function: where the two sides' float32 inputs differ in the last bit
    # at a rounding boundary, one activation moves by a step (1/127 of its block's largest value). On
    # this model one of twelve steps does, by 1.8e-3; all others agree to 1.2e-7.
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert_fused_decodes_as_op_by_op(
        model, prompt, torch.ones_like(prompt), 1e-2 if activations == "int8" else tolerance
    )
