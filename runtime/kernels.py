"""Where each fused operation runs: Triton, specformer's C++ CPU kernels, or torch (the reference).

Module forwards (RMSNorm, the gated activation, rotary, Linear) call one function here; this module is
the only place that looks at devices, dtypes, gradients and the kernels a model chose (`set_kernels`),
so a new implementation of an operation is one branch here, not a change to every module. The order is
the same for each operation: Triton when the model asked for it and the shapes allow it, then the C++
CPU kernel where it stands in for torch's ops (plain CPU tensors in float32 or bfloat16, no gradients;
`cpu_kernels.applies`), then the reference in plain torch, which every other implementation is tested
against. The C++ kernels are `torch.library` operators (`torch.ops.specformer_cpu.*`), so compiled
graphs call them as they call aten's; the choice itself stays in Python, where it costs a few attribute
checks per call rather than a trip through a Python-registered dispatcher kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from . import cpu_kernels

# Up to this many rows (tokens) a product is a matrix-vector product bound by reading the weight.
DECODE_ROWS = 16


class RotaryTables(Protocol):
    """`rope.Rope`: this forward's cos/sin tables, each (B, T, rotary_dim), and the kernel choice."""

    cos: torch.Tensor
    sin: torch.Tensor
    kernel: str

    def prepared(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]: ...


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False, kernel: str = "torch"
) -> torch.Tensor:
    """x / rms(x) * w (or * (1 + w)), over the last dim, computed in float32."""
    if kernel == "triton":
        from . import triton_kernels

        return triton_kernels.rms_norm(x, weight, eps, unit_offset)
    if not unit_offset and x.dtype == weight.dtype and cpu_kernels.applies(x, weight):
        return cpu_kernels.rms_norm(x, weight, eps)
    return reference_rms_norm(x, weight, eps, unit_offset)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    # torch's fused rms_norm computes mean(x^2) + eps, rsqrt and the product in float32, bit for bit
    # the reference formula, in one call instead of five small ops (six with the weight, in float32).
    if x.dtype == torch.float32 and weight.dtype == torch.float32 and not unit_offset:
        return F.rms_norm(x, (x.shape[-1],), weight, eps=eps)
    h = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    if unit_offset:
        # Gemma scales in float32 before casting back, unlike Llama; the order matters in half precision.
        return (h * (1.0 + weight.float())).type_as(x)
    return weight * h.type_as(x)


def gated(
    name: str,
    fn: Callable[[torch.Tensor], torch.Tensor],
    gate: torch.Tensor,
    up: torch.Tensor,
    kernel: str = "torch",
) -> torch.Tensor:
    """act(gate) * up, the GLU product, for the activation a config names (`fn`, called `name`)."""
    if kernel == "triton":
        from . import triton_kernels

        if name in triton_kernels.GATED_ACTIVATIONS:
            return triton_kernels.gated(name, gate, up)
    if name in ("silu", "swish") and gate.dtype == up.dtype and cpu_kernels.applies(gate, up):
        return cpu_kernels.silu_mul(gate, up)
    return fn(gate) * up


def rotary(q: torch.Tensor, k: torch.Tensor, rope: RotaryTables) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k, each (B, H, T, D); with a partial rotary factor only the first dims rotate."""
    rotary_dim = rope.cos.shape[-1]
    if rope.kernel == "triton":
        from . import triton_kernels

        if triton_kernels.rotary_supported(q.shape[-1], rotary_dim):
            return triton_kernels.rotary(q, rope.cos, rope.sin), triton_kernels.rotary(k, rope.cos, rope.sin)
    if rotary_dim == q.shape[-1]:
        cos, signed_sin = rope.prepared(q.dtype)
        if k.dtype == q.dtype and cpu_kernels.applies(q, k, cos):
            return cpu_kernels.rotary(q, k, cos, signed_sin)
        half = rotary_dim // 2
        return q * cos + q.roll(half, -1) * signed_sin, k * cos + k.roll(half, -1) * signed_sin
    cos, sin = rope.cos.to(q.dtype).unsqueeze(1), rope.sin.to(q.dtype).unsqueeze(1)  # (B, 1, T, rotary_dim)
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_rot = q_rot * cos + _rotate_half(q_rot) * sin
    k_rot = k_rot * cos + _rotate_half(k_rot) * sin
    return torch.cat((q_rot, q_pass), dim=-1), torch.cat((k_rot, k_pass), dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b. Decoding-sized products on the CPU stream the weight through the C++ GEMV, eager or
    compiled: oneDNN's bfloat16 GEMV reads weights well below the memory bandwidth there
    (`bench/generate.py --dtype bfloat16` compares), and MKL's float32 one at 17 GB/s where the C++ one
    reads 25-40 GB/s (2 cores of an AMD EPYC; on an Intel Xeon earlier the two were level). The C++ sums
    run in another order than MKL's: results agree with transformers' to float rounding, not bit for bit."""
    if (
        x.numel() <= DECODE_ROWS * weight.shape[1]
        and weight.is_contiguous()
        and cpu_kernels.applies_compiled_too(x, weight)
    ):
        return cpu_kernels.linear(x, weight, bias)
    return F.linear(x, weight, bias)
