"""Triton kernels (RMSNorm, rotary, gated activations) against the torch path, forward and gradients,
under TRITON_INTERPRET=1 on CPU tensors (conftest turns the interpreter on)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from specformer.runtime import triton_kernels
from specformer.runtime.layers import RMSNorm
from specformer.runtime.rope import Rope, apply_rotary


def grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, inputs, upstream)


def assert_same(ours: torch.Tensor, reference: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> None:
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads(ours, inputs), grads(reference, inputs), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm(unit_offset: bool) -> None:
    norm = RMSNorm(40, eps=1e-5, unit_offset=unit_offset)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 3, 40, requires_grad=True)
    reference = norm(x)
    norm.kernel = "triton"
    assert_same(norm(x), reference, (x, norm.weight))


@pytest.mark.parametrize("rope_batch", [1, 2])
def test_rotary(rope_batch: int) -> None:
    q = torch.randn(2, 4, 5, 16, requires_grad=True)
    k = torch.randn(2, 2, 5, 16, requires_grad=True)
    angles = torch.randn(rope_batch, 5, 8)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    reference = apply_rotary(q, k, Rope(cos, sin))
    ours = apply_rotary(q, k, Rope(cos, sin, "triton"))
    for got, want, rotated in zip(ours, reference, (q, k), strict=True):
        assert_same(got, want, (rotated,))


@pytest.mark.parametrize(
    ("name", "fn"), [("silu", F.silu), ("gelu_pytorch_tanh", lambda t: F.gelu(t, approximate="tanh"))]
)
def test_gated_activation(name: str, fn) -> None:
    gate = torch.randn(3, 7, 33, requires_grad=True)
    up = torch.randn(3, 7, 33, requires_grad=True)
    assert_same(triton_kernels.gated(name, gate, up), fn(gate) * up, (gate, up))


@pytest.mark.parametrize("package", ["llama", "gemma"])
def test_models_with_triton_kernels_match_torch(package: str) -> None:
    """Whole models (SwiGLU Llama, GeGLU + unit-offset RMSNorm Gemma): the loss and every gradient."""
    import importlib

    module = importlib.import_module(f"specformer.generated.{package}")
    prefix = package.capitalize()
    config = getattr(module, f"{prefix}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    model = getattr(module, f"{prefix}ForCausalLM")(config)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, gradients = run()
    model.set_kernels("triton")
    assert model.model.norm.kernel == "triton"
    triton_loss, triton_gradients = run()
    torch.testing.assert_close(triton_loss, loss, atol=1e-5, rtol=1e-5)
    for got, want in zip(triton_gradients, gradients, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="kernels='cuda'; expected 'torch' or 'triton'"):
        model.set_kernels("cuda")
