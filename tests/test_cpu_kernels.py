"""The fused CPU inference kernels (runtime/cpu_kernels) against the torch ops they stand in for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from specformer.runtime import cpu_kernels
from specformer.runtime.attention import AttentionMask, attend, eager_attention
from specformer.runtime.layers import Linear, RMSNorm, activation
from specformer.runtime.rope import Rope, apply_rotary

pytestmark = pytest.mark.skipif(cpu_kernels.ops() is None, reason="no C++ compiler to build the kernels")
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}


@given(
    rows=st.integers(1, 9),
    dim=st.sampled_from([8, 40, 64, 576, 1000, 4096]),
    dtype=DTYPES,
    seed=st.integers(0, 99),
)
def test_rms_norm_is_bit_exact(rows: int, dim: int, dtype: torch.dtype, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    norm = RMSNorm(dim, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=generator))
    x = (torch.randn(rows, 3, dim, generator=generator) * 4).to(dtype)
    with torch.enable_grad():  # gradients on: the torch path
        reference = norm(x)
    with torch.inference_mode():
        assert cpu_kernels.applies(x, norm.weight)
        assert torch.equal(norm(x), reference)


@given(
    shape=st.sampled_from([(1, 1, 1536), (2, 3, 40), (7,), (3, 1000), (40, 1536)]),
    dtype=DTYPES,
    seed=st.integers(0, 99),
)
def test_swiglu_is_bit_exact(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    gate, up = ((torch.randn(shape, generator=generator) * 5).to(dtype) for _ in range(2))
    act = activation("silu")
    reference = act.gated(gate, up)  # gradients on: the torch path
    with torch.inference_mode():
        assert torch.equal(act.gated(gate, up), reference)


@given(
    batch=st.integers(1, 3), rope_batch=st.booleans(), length=st.integers(1, 5), dtype=DTYPES,
    head_dim=st.sampled_from([8, 64, 80]), seed=st.integers(0, 99),
)  # fmt: skip
def test_rotary_is_bit_exact(
    batch: int, rope_batch: bool, length: int, dtype: torch.dtype, head_dim: int, seed: int
) -> None:
    """q and k as the projections leave them: (B, T, H*D) viewed as (B, H, T, D), so strided."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, 4 * head_dim, generator=generator).to(dtype)
    k = torch.randn(batch, length, 2 * head_dim, generator=generator).to(dtype)
    q, k = (t.unflatten(-1, (-1, head_dim)).transpose(1, 2) for t in (q, k))
    angles = torch.randn(batch if rope_batch else 1, length, head_dim // 2, generator=generator) * 10
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    reference = apply_rotary(q, k, Rope(cos, sin))  # gradients are on here: the torch path
    with torch.inference_mode():
        ours = apply_rotary(q, k, Rope(cos, sin))
    for got, want in zip(ours, reference, strict=True):
        assert got.is_contiguous() and torch.equal(got, want)


@given(
    batch=st.integers(1, 3), kv_heads=st.integers(1, 3), groups=st.sampled_from([1, 3]),
    keys=st.integers(1, 300), head_dim=st.sampled_from([16, 24, 64, 128]), masked=st.sampled_from(["none", "row", "batch", "slots"]),
    dtype=DTYPES, seed=st.integers(0, 99),
)  # fmt: skip
def test_decode_attention_matches_eager(
    batch: int,
    kv_heads: int,
    groups: int,
    keys: int,
    head_dim: int,
    masked: str,
    dtype: torch.dtype,
    seed: int,
) -> None:
    """One query against a cache's keys, read through views of a larger buffer as the caches hand them out."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * groups, 1, head_dim, generator=generator).to(dtype)
    k, v = (
        torch.randn(batch, kv_heads, keys + 7, head_dim, generator=generator).to(dtype)[:, :, :keys]
        for _ in range(2)
    )
    allowed = None
    if masked == "slots":  # a static cache: the first slots written, the rest empty (whole blocks of each)
        written = int(torch.randint(1, keys + 1, (), generator=generator))
        allowed = torch.arange(keys)[None] < written
    elif masked != "none":
        allowed = torch.rand(batch if masked == "batch" else 1, keys, generator=generator) > 0.4
        allowed[:, -1] = True  # the query itself
    scale = head_dim**-0.5
    with torch.inference_mode():
        ours = cpu_kernels.decode_attention(q, k, v, allowed, scale)
    keys_, values = (t.float().repeat_interleave(groups, dim=1) for t in (k, v))
    scores = (q.float() @ keys_.transpose(-2, -1)) * scale  # (B, H, 1, S)
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    reference = scores.softmax(-1) @ values
    torch.testing.assert_close(ours.float(), reference, **tolerance(dtype))


@given(
    rows=st.integers(1, 16), out_features=st.integers(1, 70), in_features=st.sampled_from([5, 16, 40, 576]),
    bias=st.booleans(), dtype=DTYPES, seed=st.integers(0, 99),
)  # fmt: skip
def test_linear_matches_torch(
    rows: int, out_features: int, in_features: int, bias: bool, dtype: torch.dtype, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 1, in_features, generator=generator).to(dtype)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    b = torch.randn(out_features, generator=generator).to(dtype) if bias else None
    with torch.inference_mode():
        ours = cpu_kernels.linear(x, weight, b)
    assert ours.shape == (rows, 1, out_features) and ours.dtype == dtype
    if dtype == torch.float32:  # a float32 dot product's rounding error scales with the sum of |terms|
        exact = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
        terms = x.double().abs() @ weight.double().abs().T + (0 if b is None else b.double().abs())
        assert ((ours.double() - exact).abs() <= 1e-6 * terms + 1e-12).all()
    else:
        reference = torch.nn.functional.linear(x.float(), weight.float(), None if b is None else b.float())
        torch.testing.assert_close(ours.float(), reference, **tolerance(dtype))


def test_linear_layers_use_the_gemv_only_to_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding-sized products run the C++ GEMV in float32 and bfloat16 (it reads weights faster than
    MKL's float32 GEMV and oneDNN's bfloat16 one here); many rows keep torch's GEMM."""
    calls: list[tuple[int, ...]] = []
    original = cpu_kernels.linear
    monkeypatch.setattr(
        cpu_kernels, "linear", lambda x, w, b: calls.append(tuple(x.shape)) or original(x, w, b)
    )
    layer = Linear(64, 32)
    x = torch.randn(3, 1, 64)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        layer(torch.randn(40, 64))
        layer.to(torch.bfloat16)
        decoded = layer(x.bfloat16())
        layer(torch.randn(40, 64).bfloat16())
    assert calls == [(3, 1, 64), (3, 1, 64)]
    reference = torch.nn.functional.linear(x, layer.weight.float(), layer.bias.float())
    torch.testing.assert_close(decoded.float(), reference, atol=1e-2, rtol=1e-2)


def test_decode_attention_with_no_visible_key_gives_zeros() -> None:
    q, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 40, 16), torch.randn(1, 1, 40, 16)
    with torch.inference_mode():
        out = cpu_kernels.decode_attention(q, k, v, torch.zeros(1, 40, dtype=torch.bool), 0.25)
    assert torch.equal(out, torch.zeros_like(out))


def test_kernels_reject_what_they_cannot_read() -> None:
    with torch.inference_mode(), pytest.raises(RuntimeError, match="one query per sequence"):
        cpu_kernels.decode_attention(
            torch.randn(1, 2, 3, 16), torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16), None, 1.0
        )
    with torch.inference_mode(), pytest.raises(RuntimeError, match="bool mask"):
        cpu_kernels.decode_attention(
            torch.randn(1, 2, 1, 16),
            torch.randn(1, 1, 5, 16),
            torch.randn(1, 1, 5, 16),
            torch.ones(1, 4, dtype=torch.bool),
            1.0,
        )


def test_only_inference_on_plain_cpu_tensors_uses_them() -> None:
    x = torch.randn(2, 8)
    assert not cpu_kernels.applies(x)  # gradients on: autograd needs torch's ops
    with torch.no_grad():
        assert cpu_kernels.applies(x)
        assert not cpu_kernels.applies(x.half())
        assert not cpu_kernels.applies(x.to("meta"))


def test_decoding_uses_them_and_matches_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A generated Llama decoding with a cache and left padding: same logits with and without the kernels."""
    from specformer.generated.llama import LlamaConfig, LlamaForCausalLM
    from specformer.runtime.cache import DynamicCache

    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    padding = torch.ones(2, 10, dtype=torch.long)
    padding[1, :3] = 0

    def decode() -> torch.Tensor:
        cache = DynamicCache()
        model(ids, attention_mask=padding[:, :9], past_key_values=cache, use_cache=True)
        step = model(ids[:, -1:], attention_mask=padding, past_key_values=cache, use_cache=True)
        return step.logits

    calls: list[str] = []
    for name in ("rms_norm", "rotary", "decode_attention", "silu_mul"):
        original = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    with torch.inference_mode():
        fused = decode()
    assert {"rms_norm", "rotary", "decode_attention", "silu_mul"} <= set(calls)
    monkeypatch.setattr(cpu_kernels, "applies", lambda *tensors: False)
    with torch.inference_mode():
        reference = decode()
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


def test_compiled_graphs_call_the_gemv_and_attention_kernels() -> None:
    """Inductor fuses norms and rotary itself, but its bf16 GEMV and masked decode attention are slower:
    compiled decode steps keep calling those two kernels."""
    targets: list[str] = []

    def recording_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        targets.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return graph.forward

    layer = Linear(64, 32).to(torch.bfloat16)
    mask = AttentionMask(None, 1, 7, backend="specformer_cpu")

    def step(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return layer(x), attend(q, k, v, mask, causal=True)

    x, q, k, v = (
        torch.randn(1, 1, 64),
        torch.randn(1, 4, 1, 16),
        torch.randn(1, 2, 8, 16),
        torch.randn(1, 2, 8, 16),
    )
    compiled = torch.compile(step, backend=recording_backend, fullgraph=True)
    with torch.inference_mode():
        got = compiled(x.bfloat16(), q, k, v)
        want = step(x.bfloat16(), q, k, v)
    assert "specformer_cpu.linear" in targets
    assert "specformer_cpu.decode_attention" in targets
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_without_a_compiler_torch_ops_run_after_one_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(FileNotFoundError, match="no-such-compiler"):
        cpu_kernels.build(tmp_path)
    assert not list(tmp_path.glob("kernels/*"))  # no half-written library left behind

    def unavailable() -> None:
        raise RuntimeError("`c++` failed to build decode.cpp")

    monkeypatch.setattr(cpu_kernels, "load", unavailable)
    cpu_kernels.ops.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"fused CPU kernels are unavailable \(`c\+\+` failed"):
            assert cpu_kernels.ops() is None
        with torch.no_grad():
            assert not cpu_kernels.applies(torch.randn(3))
            x = torch.randn(2, 16)
            norm = RMSNorm(16)
            torch.testing.assert_close(norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))
        monkeypatch.setenv("SPECFORMER_CPU_KERNELS", "0")
        cpu_kernels.ops.cache_clear()
        assert cpu_kernels.ops() is None  # switched off: nothing is built, nothing is said
    finally:
        monkeypatch.undo()
        cpu_kernels.ops.cache_clear()
    assert cpu_kernels.ops() is not None


def test_attend_dispatches_only_single_queries() -> None:
    """A prompt (several queries) still goes through torch's SDPA; the result matches either way."""
    q, k, v = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    mask = AttentionMask(None, 3, backend="specformer_cpu")
    with torch.inference_mode():
        out = attend(q, k, v, mask, causal=True)
    reference = eager_attention(q, k, v, mask, causal=True, window=None, dropout=0.0, scale=None)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_the_avx2_build_passes_these_tests_too(tmp_path: Path) -> None:
    """CPUs without AVX-512 get the portable loops (and torch's AVX2 silu): this file again, built so."""
    import os
    import subprocess
    import sys

    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX2"):
        pytest.skip("an x86 CPU with AVX2 is needed")
    env = os.environ | {"ATEN_CPU_CAPABILITY": "avx2", "SPECFORMER_CACHE": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not avx2_build"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    assert list(tmp_path.glob("kernels/*.so"))  # built for AVX2 there, not taken from the usual cache


# How a packed layer's scales and offsets are stored: in the model's dtype with offsets (quantized here),
# float16 as a GGUF file's Q8_0/Q4_1 blocks keep them, or float16 and symmetric, no offsets (Q4_0).
# how a packed layer stores its scales: in the model's dtype, as float16 (a GGUF file's), symmetric (no
# offsets: Q4_0, or plain int8), or float16 with offsets (int8 too: Q5_1's 5-bit values and minimums)
STORAGES = st.sampled_from(["model", "float16", "symmetric", "offsets"])


def _random_packed(
    bits: int,
    shape: tuple[int, int],
    group: int | None,
    bias: bool,
    dtype: torch.dtype,
    storage: str,
    **kwargs,
) -> torch.nn.Module:
    """A packed layer with random integer weights, scales, offsets and bias, stored as `storage` says."""
    from specformer.runtime.quantization import Int4Linear, Int8Linear

    in_features, out_features = shape
    stored = torch.float16 if storage != "model" else dtype
    if bits == 4:
        layer = Int4Linear(
            in_features, out_features, 32, bias, dtype, symmetric=storage == "symmetric", **kwargs
        )
        layer.weight.data = torch.randint(0, 256, layer.weight.shape, dtype=torch.uint8)
        if layer.offsets is not None:
            layer.offsets.data = (torch.randn(layer.offsets.shape) * 0.1).to(stored)
    else:
        layer = Int8Linear(
            in_features, out_features, group, bias, dtype, symmetric=storage != "offsets", **kwargs
        )
        layer.weight.data = torch.randint(-127, 128, layer.weight.shape, dtype=torch.int8)
        if layer.offsets is not None:
            layer.offsets.data = (torch.randn(layer.offsets.shape) * 0.1).to(stored)
    layer.scales.data = (torch.rand(layer.scales.shape) * 0.01).to(stored)
    if bias:
        layer.bias.data = torch.randn(out_features).to(dtype)
    return layer


@given(
    bits=st.sampled_from([8, 4]),
    rows=st.integers(1, 8),
    shape=st.sampled_from([(32, 8), (96, 40), (576, 193), (1536, 64)]),
    group=st.sampled_from([32, None]),
    bias=st.booleans(),
    dtype=DTYPES,
    storage=STORAGES,
    seed=st.integers(0, 99),
)
def test_packed_linear_matches_the_dequantised_matmul(
    bits, rows, shape, group, bias, dtype, storage, seed
) -> None:
    """Random int8 / packed int4 blocks with random scales and offsets (what a GGUF file holds), against
    F.linear on the dequantised weight; per-channel int8 groups take the scalar path."""
    torch.manual_seed(seed)
    in_features = shape[0]
    layer = _random_packed(bits, shape, group, bias, dtype, storage)
    x = torch.randn(rows, in_features).to(dtype)
    with torch.no_grad():
        float_layer = _random_packed(bits, shape, layer.group_size, bias, torch.float32, storage)
        float_layer.load_state_dict(  # the same values in float32: dequantised in float32
            {k: v.float() if v.is_floating_point() else v for k, v in layer.state_dict().items()}
        )
        expected = torch.nn.functional.linear(
            x.float(), float_layer.dequantize(), None if not bias else layer.bias.float()
        )
        actual = cpu_kernels.packed_linear(
            x, layer.weight, layer.scales, getattr(layer, "offsets", None), layer.bias, bits
        )
        assert torch.equal(layer(x), actual)  # the layer's eager forward is the kernel
        magnitude = x.float().abs() @ float_layer.dequantize().abs().T
    if dtype == torch.float32:  # sums of up to 1536 products in another order (the scalar path: serially)
        assert ((actual - expected).abs() <= 1e-5 + 4e-7 * magnitude).all()
    else:
        torch.testing.assert_close(actual.float(), expected, **tolerance(dtype))


def _int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x as the integer kernels see it: rounded to int8 per block of 32 (scale max|x| / 127, round half
    to even of x times the scale's inverse), dequantised."""
    blocks = x.float().unflatten(-1, (-1, 32))
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(blocks * inverse) * scale).flatten(-2)


@given(
    bits=st.sampled_from([8, 4]),
    rows=st.integers(1, 8),
    shape=st.sampled_from([(32, 8), (96, 40), (160, 7), (576, 193), (1536, 64)]),
    group=st.sampled_from([16, 32, None]),
    bias=st.booleans(),
    dtype=DTYPES,
    storage=STORAGES,
    seed=st.integers(0, 99),
)
def test_integer_dot_products_match_int8_rounded_activations(
    bits, rows, shape, group, bias, dtype, storage, seed
):
    """`int8_activations`: x rounded to int8 per block of 32 and integer dot products (llama.cpp's
    arithmetic), against float math on the rounded x and the dequantised weights. The shapes cover whole
    groups of four blocks, tails of one to three, per-channel int8 scales and int8 groups of 16 (Q6_K's)."""
    # int8 groups of 16 with offsets (no GGUF type's) widen to float: the test above covers them
    assume(not (bits == 8 and group == 16 and storage == "offsets"))
    torch.manual_seed(seed)
    in_features = shape[0]
    group = group or in_features  # None: per channel
    layer = _random_packed(bits, shape, group, bias, dtype, storage, activations="int8")
    x = torch.randn(rows, in_features).to(dtype)
    x[0, :32] = 0  # a block of zeros has scale 0
    scales = layer.scales.float().repeat_interleave(layer.group_size, 1)
    if bits == 4:
        q = torch.cat(layer._nibbles(torch.float32), -1).flatten(1)
        offsets = layer._offsets(torch.float32).repeat_interleave(32, 1)
        products = [(_int8_blocks(x), q * scales + offsets)]
    else:
        offsets = 0 if layer.offsets is None else layer.offsets.float().repeat_interleave(layer.group_size, 1)
        products = [(_int8_blocks(x), layer.weight.float() * scales + offsets)]
    expected = sum(a @ w.T for a, w in products) + (layer.bias.float() if bias else 0)
    # float32 sums of up to 1536 products in another order: a few units of rounding of their magnitudes
    magnitude = sum(a.abs() @ w.abs().T for a, w in products)
    with torch.no_grad():
        actual = cpu_kernels.packed_linear(
            x, layer.weight, layer.scales, getattr(layer, "offsets", None), layer.bias, bits, True
        )
        assert torch.equal(layer(x), actual)  # the layer's eager forward is the kernel
    if dtype == torch.float32:
        assert ((actual - expected).abs() <= 1e-5 + 4e-7 * magnitude).all()
    else:
        torch.testing.assert_close(actual.float(), expected, **tolerance(dtype))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("storage", ["model", "float16", "symmetric", "offsets"])
def test_dequantize_packed_gives_the_layers_weight(bits: int, dtype: torch.dtype, storage: str) -> None:
    """A prompt's rows multiply the weight dequantised in one C++ pass: bit for bit the layer's own."""
    torch.manual_seed(bits)
    layer = _random_packed(bits, (96, 40), 32, False, dtype, storage)
    offsets = getattr(layer, "offsets", None)
    fast = cpu_kernels.dequantize_packed(layer.weight, layer.scales, offsets, bits, torch.float32)
    torch.testing.assert_close(fast, layer.float().dequantize(), atol=0, rtol=0)
    x = torch.randn(3, 20, 96)  # 60 rows: the prompt path
    with torch.no_grad():
        torch.testing.assert_close(layer.float()(x), x @ fast.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("activations", ["float", "int8"])
def test_prompts_multiply_in_bfloat16_only_in_llama_cpp_arithmetic(bits: int, activations: str) -> None:
    """A float32 prompt through a packed layer: float32 GEMM on the dequantised weight with float
    activations; with int8 ones (llama.cpp's arithmetic) on a CPU with native bfloat16, oneDNN's bfloat16
    GEMM on the weight and activations rounded to bfloat16, the bias added in float32. Each weight is
    dequantised into one buffer that every layer of the thread reuses."""
    from specformer.runtime.quantization import weight_only

    torch.manual_seed(bits)
    layers = [_random_packed(bits, (96, 40), 32, True, torch.float32, "float16", activations=activations)
              for _ in range(2)]  # fmt: skip
    x = torch.randn(3, 20, 96)  # 60 rows: more than the packed kernels take
    bfloat16 = activations == "int8" and weight_only._native_bfloat16()
    buffers = set()
    with torch.no_grad():
        for layer in layers:
            w = layer.dequantize()
            offsets = getattr(layer, "offsets", None)
            direct = cpu_kernels.dequantize_packed(layer.weight, layer.scales, offsets, bits, torch.bfloat16)
            assert torch.equal(direct, w.bfloat16())  # rounded to nearest even, as torch rounds
            if bfloat16:
                expected = torch.nn.functional.linear(x.bfloat16(), w.bfloat16()).float() + layer.bias
            else:
                expected = torch.nn.functional.linear(x, w, layer.bias)
            assert torch.equal(layer(x), expected)
            buffers.add(
                weight_only._WORKSPACE.buffers[torch.bfloat16 if bfloat16 else torch.float32].data_ptr()
            )
    assert len(buffers) == 1
