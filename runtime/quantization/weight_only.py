"""Weight-only quantization in plain torch: int8 and int4 linear layers, group-wise scales.

A quantized layer stores integer weights and per-group scales; an int4 layer also per-group offsets
(w = q * scale + offset, the min/max scheme of Q4_1), or none when it is symmetric (w = (q - 8) * scale,
Q4_0's scheme: fewer bytes to read per weight). Scales keep the dtype they were made or loaded in: a GGUF
file's float16 scales stay float16, which is another tenth fewer bytes for an int4 model to stream. On the CPU, eager, the C++ kernels
(`cpu_kernels`) read the packed weights directly for a few rows (decoding): each weight widened to float
(`activations="float"`: the dequantised layer's numbers up to the order of the sums), or, with
`activations="int8"`, activations rounded to int8 per block of 32 and integer dot products (llama.cpp's
arithmetic; what GGUF loads use). A prompt's many rows dequantise the weight in one pass and run torch's
GEMM, which measured faster than integer dot products for them. Under `torch.compile`, a few rows are
written as multiply-and-sum over the integer weights, which inductor fuses into one pass. PyTorch's packed
kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) were slower than fp32 on CPUs, so they
are not used.

The layouts match llama.cpp's blocks so GGUF Q8_0, Q4_0 and Q4_1 weights load without a float round trip:
int4 packs each group of `group_size` values as `group_size / 2` bytes, the first half of the group in
the low nibbles and the second half in the high nibbles.

Which layers are quantized: every `nn.Linear` of the backbone (the spec's blocks); heads such as
`lm_head` keep full precision unless listed, as quantizing the output projection costs the most quality.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import cpu_kernels
from .modules import quantizable_linears, remember_quantization, replace_modules

# Under torch.compile, rows at or below this use the multiply-and-sum form (decoding), which inductor
# fuses; more rows, or eager mode (where that form would materialise a float product), dequantise.
_MATVEC_ROWS = 4


@dataclass
class WeightOnlyConfig:
    """`quantization_config` for torch-native weight-only quantization (serialised into config.json)."""

    bits: int = 8
    group_size: int | None = None  # None: per output channel for int8, 32 for int4
    modules_to_not_convert: list[str] = field(default_factory=list)
    modules_to_convert: list[str] = field(default_factory=list)  # heads to quantize too, e.g. lm_head
    # int4 only: (q - 8) * scale per group (Q4_0: no offsets stored) instead of q * scale + minimum (Q4_1)
    symmetric: bool = False
    # How the CPU kernels multiply: "float" widens each weight (the dequantised layer's numbers up to the
    # order of the sums); "int8" rounds activations to int8 per block of 32 and takes integer dot
    # products, as llama.cpp does (faster; the activations' rounding changes the numbers slightly).
    activations: str = "float"
    quant_method: str = "weight_only"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"WeightOnlyConfig: bits={self.bits}; expected 8 or 4")
        _check_activations(self.activations)
        if self.group_size is None and self.bits == 4:
            self.group_size = 32
        if self.group_size is not None and (self.group_size < 2 or self.group_size % 2):
            raise ValueError(f"WeightOnlyConfig: group_size={self.group_size}; expected an even number >= 2")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> WeightOnlyConfig:
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class Int8Linear(nn.Module):
    """y = x W^T + b with W = weight (int8) * scales, one scale per `group_size` inputs of each row; with
    `symmetric=False`, W = weight * scales + offsets (GGUF's Q5_1 and Q5_K: 5-bit q with a minimum)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int | None = None,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        activations: str = "float",
        symmetric: bool = True,
    ) -> None:
        super().__init__()
        group_size = group_size or in_features
        _check_groups(in_features, group_size, "int8")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.activations = _check_activations(activations)
        groups = in_features // group_size
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False
        )
        self.scales = nn.Parameter(
            torch.empty(out_features, groups, dtype=dtype, device=device), requires_grad=False
        )
        offsets = torch.empty(out_features, groups, dtype=dtype, device=device)
        self.register_parameter("offsets", None if symmetric else nn.Parameter(offsets, requires_grad=False))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int | None = None, activations: str = "float"
    ) -> Int8Linear:
        weight = linear.weight.detach()
        group_size = group_size or weight.shape[1]
        module = _shaped_like(cls, linear, group_size, activations)
        grouped = weight.float().unflatten(1, (-1, group_size))
        scales = grouped.abs().amax(-1).clamp(min=1e-12) / 127
        module.weight.data = (grouped / scales[..., None]).round().clamp(-127, 127).to(torch.int8).flatten(1)
        module.scales.data = scales.to(weight.dtype)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float weight (in the scales' dtype; float32 for float16 scales), or just its `rows`."""
        dtype = _exact_dtype(self.scales)
        weight, scales = (
            (self.weight, self.scales) if rows is None else (self.weight[rows], self.scales[rows])
        )
        grouped = weight.unflatten(1, (-1, self.group_size)).to(dtype) * scales.to(dtype)[..., None]
        if self.offsets is not None:
            offsets = self.offsets if rows is None else self.offsets[rows]
            grouped = grouped + offsets.to(dtype)[..., None]
        return grouped.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _packed_kernel(self, x):
            integer = self.activations == "int8"
            return cpu_kernels.packed_linear(x, self.weight, self.scales, self.offsets, self.bias, 8, integer)
        if _dequantize_kernel(x):
            return _prompt_linear(self, x, self.offsets, 8)
        if x.numel() // self.in_features > _MATVEC_ROWS or not torch.compiler.is_compiling():
            return F.linear(x, self.dequantize().to(x.dtype), self.bias)
        # Widening through int32 lets inductor vectorise the conversion; one reduction over the whole row.
        xg = x.unflatten(-1, (-1, self.group_size)).unsqueeze(-3)  # (..., 1, groups, group)
        w = (
            self.weight.unflatten(1, (-1, self.group_size)).to(torch.int32).to(x.dtype)
        )  # (out, groups, group)
        w = w * self.scales.to(x.dtype)[..., None]
        if self.offsets is not None:
            w = w + self.offsets.to(x.dtype)[..., None]
        y = (xg * w).sum((-1, -2))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, group_size={self.group_size}, "
            f"bias={self.bias is not None}, activations={self.activations}, symmetric={self.offsets is None}"
        )


class Int4Linear(nn.Module):
    """y = x W^T + b with W = q * scales + offsets, q in 0..15 packed two per byte (llama.cpp's Q4 layout);
    a symmetric layer has no offsets: W = (q - 8) * scales."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int = 32,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        activations: str = "float",
        symmetric: bool = False,
    ) -> None:
        super().__init__()
        _check_groups(in_features, group_size, "int4")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.activations = _check_activations(activations)
        groups = in_features // group_size
        self.weight = nn.Parameter(
            torch.empty(out_features, groups, group_size // 2, dtype=torch.uint8, device=device),
            requires_grad=False,
        )
        self.scales = nn.Parameter(
            torch.empty(out_features, groups, dtype=dtype, device=device), requires_grad=False
        )
        offsets = torch.empty(out_features, groups, dtype=dtype, device=device)
        self.register_parameter("offsets", None if symmetric else nn.Parameter(offsets, requires_grad=False))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int = 32, activations: str = "float", symmetric: bool = False
    ) -> Int4Linear:
        weight = linear.weight.detach()
        module = _shaped_like(cls, linear, group_size, activations, symmetric)
        grouped = weight.float().unflatten(1, (-1, group_size))
        if symmetric:  # Q4_0: the value of largest magnitude is -8 * scale, exactly
            extreme = grouped.gather(-1, grouped.abs().argmax(-1, keepdim=True)).squeeze(-1)
            scales = torch.where(extreme == 0, 1e-12, extreme / -8)
            q = (grouped / scales[..., None]).round().add(8).clamp(0, 15).to(torch.uint8)
        else:
            low, high = grouped.amin(-1), grouped.amax(-1)
            scales = ((high - low) / 15).clamp(min=1e-12)
            q = ((grouped - low[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.uint8)
            module.offsets.data = low.to(weight.dtype)
        half = group_size // 2
        module.weight.data = q[..., :half] | (q[..., half:] << 4)
        module.scales.data = scales.to(weight.dtype)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def _nibbles(
        self, dtype: torch.dtype, weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first and second half of each group; bit operations in int32, which inductor vectorises."""
        packed = (self.weight if weight is None else weight).to(torch.int32)
        return (packed & 15).to(dtype), (packed >> 4).to(dtype)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float weight (in the scales' dtype; float32 for float16 scales), or just its `rows`."""
        dtype = _exact_dtype(self.scales)
        weight, scales, offsets = self.weight, self.scales, self.offsets
        if rows is not None:  # only the rows asked for are converted
            weight, scales = weight[rows], scales[rows]
            offsets = None if offsets is None else offsets[rows]
        q = torch.cat(self._nibbles(dtype, weight), dim=-1)  # (out, groups, group)
        return (q * scales.to(dtype)[..., None] + _group_offsets(scales, offsets, dtype)[..., None]).flatten(
            1
        )

    def _offsets(self, dtype: torch.dtype) -> torch.Tensor:
        return _group_offsets(self.scales, self.offsets, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _packed_kernel(self, x):
            integer = self.activations == "int8"
            return cpu_kernels.packed_linear(x, self.weight, self.scales, self.offsets, self.bias, 4, integer)
        if _dequantize_kernel(x):
            return _prompt_linear(self, x, self.offsets, 4)
        if x.numel() // self.in_features > _MATVEC_ROWS or not torch.compiler.is_compiling():
            return F.linear(x, self.dequantize().to(x.dtype), self.bias)
        xg = x.unflatten(-1, (-1, 2, self.group_size // 2)).unsqueeze(-4)  # (..., 1, groups, 2, half)
        scales, offsets = self.scales.to(x.dtype)[..., None], self._offsets(x.dtype)[..., None]
        low, high = (q * scales + offsets for q in self._nibbles(x.dtype))  # dequantised in registers
        y = (xg[..., 0, :] * low + xg[..., 1, :] * high).sum((-1, -2))  # one reduction over the row
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, group_size={self.group_size}, "
            f"bias={self.bias is not None}, activations={self.activations}, symmetric={self.offsets is None}"
        )


def _group_offsets(scales: torch.Tensor, offsets: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Each group's offset: stored, or -8 * scale (exact in any float type) for a symmetric layer."""
    return (scales * -8 if offsets is None else offsets).to(dtype)


def _exact_dtype(scales: torch.Tensor) -> torch.dtype:
    """The dtype to dequantise in: the scales', but float32 for float16 scales (a file's), as llama.cpp's
    dequantisers compute q * d in float32 (in float16 the products of 4-bit q and an 11-bit d would round)."""
    return torch.float32 if scales.dtype == torch.float16 else scales.dtype


def _packed_kernel(layer: Int8Linear | Int4Linear, x: torch.Tensor) -> bool:
    """Eager decoding on the CPU: the C++ kernel reads the packed weights directly, for up to a few
    rows; more go to a dequantised matmul, which reuses each weight across them."""
    rows = x.numel() // max(layer.in_features, 1)
    if rows > _KERNEL_ROWS[layer.activations] or (layer.bias is not None and layer.bias.dtype != x.dtype):
        return False
    return cpu_kernels.applies(x)


def _dequantize_kernel(x: torch.Tensor) -> bool:
    return not torch.compiler.is_compiling() and cpu_kernels.applies(x)


class _Workspace(threading.local):
    """Where a prompt's layers dequantise their weights, one after another: one buffer per thread and
    dtype, reused. A fresh multi-megabyte tensor per layer is handed back to the OS when freed and its
    pages faulted in again next time, which measured 3.6x the dequantising itself (a 1536 x 576 int4
    matrix: 340 vs 93 us) and slowed the GEMM reading it by half as much again."""

    LARGEST = 1 << 23  # values; a larger weight (a vocabulary-sized head) gets a tensor of its own

    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor | None:
        if numel > self.LARGEST:
            return None
        buffer = self.buffers.get(dtype)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[dtype] = torch.empty(numel, dtype=dtype)
        return buffer[:numel]


_WORKSPACE = _Workspace()


def _prompt_linear(
    layer: Int8Linear | Int4Linear, x: torch.Tensor, offsets: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """A prompt's rows (more than the packed kernel takes): the weight dequantised in one C++ pass into
    the workspace, then torch's GEMM, in the dtype `_prompt_dtype` picks."""
    dtype = _prompt_dtype(layer, x)
    buffer = _WORKSPACE.take(layer.in_features * layer.out_features, dtype)
    weight = cpu_kernels.dequantize_packed(layer.weight, layer.scales, offsets, bits, dtype, buffer)
    if dtype == x.dtype:
        return F.linear(x, weight, layer.bias)
    y = F.linear(x.to(dtype), weight).to(x.dtype)
    return y if layer.bias is None else y + layer.bias


def _prompt_dtype(layer: Int8Linear | Int4Linear, x: torch.Tensor) -> torch.dtype:
    """bfloat16 for a float32 prompt through a layer in llama.cpp's arithmetic (`activations="int8"`) on
    a CPU that multiplies bfloat16 natively (AVX512-BF16, AMX), else x's dtype. oneDNN's bfloat16 GEMM
    measured 2.5x float32's on SmolLM2's matrices (int8 GEMMs with a scale per block of 32, as the
    activations are rounded for decoding, measured slower than float32's); rounding the activations,
    weights and outputs to bfloat16 (8 significant bits) costs about what llama.cpp's int8 activations
    (a step of 1/127 of each block's largest value) do. `activations="float"` keeps float32 throughout."""
    if layer.activations == "int8" and x.dtype == torch.float32 and _native_bfloat16():
        return torch.bfloat16
    return x.dtype


@functools.cache
def _native_bfloat16() -> bool:
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


# Rows up to which the packed C++ kernel runs (eager), measured against dequantising + torch's GEMM on
# SmolLM2's matrices: widening each weight to float costs the same again for every row, so 8; integer
# dot products share each weight load among four rows and win up to ~64 rows, so 32.
_KERNEL_ROWS = {"float": 8, "int8": 32}


def _shaped_like(
    cls: type[nn.Module], linear: nn.Linear, group_size: int, activations: str, *symmetric: bool
) -> Any:
    """An empty quantized layer of `linear`'s sizes, dtype and device."""
    weight = linear.weight
    bias = linear.bias is not None
    return cls(
        weight.shape[1],
        weight.shape[0],
        group_size,
        bias,
        weight.dtype,
        weight.device,
        activations,
        *symmetric,
    )


def _check_activations(activations: str) -> str:
    if activations not in ("float", "int8"):
        raise ValueError(f"activations={activations!r}; expected 'float' or 'int8'")
    return activations


def _check_groups(in_features: int, group_size: int, kind: str) -> None:
    if in_features % group_size:
        raise ValueError(
            f"{kind} quantization: group_size={group_size} does not divide in_features={in_features}; "
            f"pick a divisor of {in_features}"
        )


QUANTIZED_LINEARS = (Int8Linear, Int4Linear)


def quantize_weight_only(model: nn.Module, config: WeightOnlyConfig) -> nn.Module:
    """Replace the backbone's linear layers by int8/int4 ones, in place, one layer at a time (the float
    weight of a layer is freed as soon as its quantized copy exists). Returns `model`."""
    names = quantizable_linears(model, config.modules_to_not_convert, config.modules_to_convert)

    def make(_: str, old: nn.Linear) -> nn.Module:
        if config.bits == 8:
            return Int8Linear.from_linear(old, config.group_size, config.activations)
        return Int4Linear.from_linear(old, config.group_size or 32, config.activations, config.symmetric)

    replace_modules(model, names, make)
    remember_quantization(model, config.to_dict())
    return model


def prepare_weight_only(
    model: nn.Module, config: WeightOnlyConfig, layers: dict[str, QuantizedLayout] | None = None
) -> None:
    """Give a (meta-built) model empty quantized layers so a quantized checkpoint can be assigned to it.

    `layers` maps module names to their layouts when they differ per layer (a GGUF file's mix);
    otherwise every quantizable linear gets `config`'s format.
    """
    if layers is None:
        group = config.group_size or (32 if config.bits == 4 else None)
        names = quantizable_linears(model, config.modules_to_not_convert, config.modules_to_convert)
        symmetric = config.symmetric or config.bits == 8  # load-time int8 has no offsets
        layers = dict.fromkeys(names, QuantizedLayout(config.bits, group, symmetric))

    def make(name: str, old: nn.Module) -> nn.Module:
        layout = layers[name]
        args = (
            old.in_features,
            old.out_features,
            layout.group or old.in_features,
            old.bias is not None,
            old.weight.dtype,
            old.weight.device,
            config.activations,
        )
        kind = Int8Linear if layout.bits == 8 else Int4Linear
        return kind(*args, symmetric=layout.symmetric)

    replace_modules(model, layers, make)
    remember_quantization(model, config.to_dict())


class QuantizedLayout(NamedTuple):
    """How one quantized linear stores its weight: bits, inputs per scale, and whether symmetric (no
    offsets: int4's are then -8 * scale, int8's zero)."""

    bits: int
    group: int | None
    symmetric: bool = False


def quantized_layers(tensors: dict[str, torch.Tensor]) -> dict[str, QuantizedLayout]:
    """The layout of each quantized linear in a checkpoint, read off its tensors' dtypes, shapes and keys."""
    layers = {}
    for key, scales in tensors.items():
        if not key.endswith(".scales"):
            continue
        module = key.removesuffix(".scales")
        weight = tensors[module + ".weight"]
        if weight.dtype == torch.int8:
            layers[module] = QuantizedLayout(
                8, weight.shape[1] // scales.shape[1], module + ".offsets" not in tensors
            )
        elif weight.dtype == torch.uint8 and weight.dim() == 3:
            layers[module] = QuantizedLayout(4, 2 * weight.shape[2], module + ".offsets" not in tensors)
    return layers
