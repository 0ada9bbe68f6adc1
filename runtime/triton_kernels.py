"""Triton kernels for the elementwise hot spots of the specs: RMSNorm, rotary embedding, gated activations.

Each is an autograd Function with its own forward and backward kernel, computing in float32 and storing
in the input dtype, like the torch path it replaces. Select them per model with
`model.set_kernels("triton")` or `from_pretrained(..., kernels="triton")`; they run on CUDA/XPU, and on
CPU tensors under `TRITON_INTERPRET=1` (set before this module is imported), which is how they are tested.
This module imports triton at import time, so only `layers.py`/`rope.py` import it, lazily, when asked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(-1, x.shape[-1])


# ---- RMSNorm ------------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, D, eps, UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < D
    x = tl.load(X + row * D + cols, mask=inside, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    scale = 1.0 + w if UNIT_OFFSET else w
    tl.store(Y + row * D + cols, (x * rstd * scale).to(Y.dtype.element_ty), mask=inside)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DX, DW_ROWS, D, UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < D
    x = tl.load(X + row * D + cols, mask=inside, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * D + cols, mask=inside, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    x_hat = x * rstd
    g = dy * (1.0 + w if UNIT_OFFSET else w)
    dx = rstd * (g - x_hat * tl.sum(g * x_hat, axis=0) / D)
    tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=inside)
    tl.store(DW_ROWS + row * D + cols, dy * x_hat, mask=inside)  # summed over rows afterwards


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
        rows = _rows(x)
        y = torch.empty_like(rows)
        rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(rows.shape[1])
        _rms_norm_fwd[(rows.shape[0],)](rows, weight, y, rstd, rows.shape[1], eps, unit_offset, block)
        ctx.save_for_backward(rows, weight, rstd)
        ctx.unit_offset = unit_offset
        return y.view_as(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        rows, weight, rstd = ctx.saved_tensors
        dy_rows = _rows(dy)
        dx = torch.empty_like(rows)
        dw_rows = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
        block = triton.next_power_of_2(rows.shape[1])
        _rms_norm_bwd[(rows.shape[0],)](
            dy_rows, rows, weight, rstd, dx, dw_rows, rows.shape[1], ctx.unit_offset, block
        )
        return dx.view_as(dy), dw_rows.sum(0).to(weight.dtype), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """x / rms(x) * w (or * (1 + w)), over the last dimension."""
    return _RMSNorm.apply(x, weight, eps, unit_offset)


# ---- rotary embedding (rotate-half layout) -----------------------------------------------------------
@triton.jit
def _rotary_kernel(X, COS, SIN, Y, heads, seq, cos_batch_stride, HALF: tl.constexpr, BACKWARD: tl.constexpr):
    row = tl.program_id(0)  # one (batch, head, position) row of x
    b = row // (heads * seq)
    t = row % seq
    cols = tl.arange(0, HALF)
    base = COS + b * cos_batch_stride + t * 2 * HALF
    cos1 = tl.load(base + cols)
    cos2 = tl.load(base + HALF + cols)
    sbase = SIN + b * cos_batch_stride + t * 2 * HALF
    sin1 = tl.load(sbase + cols)
    sin2 = tl.load(sbase + HALF + cols)
    x1 = tl.load(X + row * 2 * HALF + cols).to(tl.float32)
    x2 = tl.load(X + row * 2 * HALF + HALF + cols).to(tl.float32)
    if BACKWARD:  # the transpose of the rotation
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    tl.store(Y + row * 2 * HALF + cols, y1.to(Y.dtype.element_ty))
    tl.store(Y + row * 2 * HALF + HALF + cols, y2.to(Y.dtype.element_ty))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    batch, heads, seq, dim = x.shape
    rows = x.contiguous()
    y = torch.empty_like(rows)
    cos_batch_stride = 0 if cos.shape[0] == 1 else seq * dim
    _rotary_kernel[(batch * heads * seq,)](
        rows, cos, sin, y, heads, seq, cos_batch_stride, dim // 2, backward
    )
    return y


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, backward=True), None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by cos/sin tables (B or 1, T, D) in float32; D a power of two."""
    return _Rotary.apply(x, cos.float().contiguous(), sin.float().contiguous())


def rotary_supported(head_dim: int, rotary_dim: int) -> bool:
    return rotary_dim == head_dim and head_dim & (head_dim - 1) == 0


# ---- gated activations: act(gate) * up -----------------------------------------------------------------
@triton.jit
def _act(g, GELU: tl.constexpr):
    if GELU:  # the tanh approximation, tanh(z) = 2 sigmoid(2z) - 1
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    return g * tl.sigmoid(g)


@triton.jit
def _act_grad(g, GELU: tl.constexpr):
    if GELU:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        th = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        d_inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
        return 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * d_inner
    s = tl.sigmoid(g)
    return s * (1.0 + g * (1.0 - s))


@triton.jit
def _gated_fwd(G, U, Y, N, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    g = tl.load(G + offs, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(Y + offs, (_act(g, GELU) * u).to(Y.dtype.element_ty), mask=inside)


@triton.jit
def _gated_bwd(DY, G, U, DG, DU, N, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    dy = tl.load(DY + offs, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(DG + offs, (dy * u * _act_grad(g, GELU)).to(DG.dtype.element_ty), mask=inside)
    tl.store(DU + offs, (dy * _act(g, GELU)).to(DU.dtype.element_ty), mask=inside)


_BLOCK = 1024


class _Gated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        n = gate.numel()
        _gated_fwd[(triton.cdiv(n, _BLOCK),)](gate, up, y, n, gelu, _BLOCK)
        ctx.save_for_backward(gate, up)
        ctx.gelu = gelu
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _gated_bwd[(triton.cdiv(n, _BLOCK),)](dy.contiguous(), gate, up, dg, du, n, ctx.gelu, _BLOCK)
        return dg, du, None


GATED_ACTIVATIONS = {
    "silu": False,
    "swish": False,
    "gelu_pytorch_tanh": True,
    "gelu_new": True,
    "gelu_fast": True,
}


def gated(name: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up for the activations in GATED_ACTIVATIONS (SwiGLU, tanh-GeGLU)."""
    return _Gated.apply(gate, up, GATED_ACTIVATIONS[name])
