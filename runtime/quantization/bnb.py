"""bitsandbytes quantization on load: LLM.int8() (8-bit) and 4-bit NF4/FP4 linear layers.

bitsandbytes is an optional extra (`pip install "specformer[quant]"`), imported only when asked for.
The same layers as weight-only quantization are replaced (the backbone's `nn.Linear`s; heads such as
`lm_head` keep full precision). Quantized checkpoints save in bitsandbytes' own state-dict layout, as
Hugging Face writes them, and reload without a float round trip: 8-bit weights are assigned with their
`SCB` statistics, 4-bit ones through `Params4bit.from_prequantized`.

4-bit layers keep bitsandbytes' portable weight layout on the CPU (see `_empty_layer`), so saving and
reloading is exact. Since 0.45 bitsandbytes runs on the CPU too, but dequantises the whole weight for every call there; use
`WeightOnlyConfig` for fast CPU inference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..hardware import require
from .modules import quantizable_linears, remember_quantization, replace_modules

_FEATURE = "BitsAndBytesConfig"


@dataclass
class BitsAndBytesConfig:
    """The fields and defaults of Hugging Face's BitsAndBytesConfig, serialised the same way."""

    load_in_8bit: bool = False
    load_in_4bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] | None = None
    llm_int8_enable_fp32_cpu_offload: bool = False
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_compute_dtype: str = "float32"
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: str = "uint8"
    quant_method: str = "bitsandbytes"

    def __post_init__(self) -> None:
        if isinstance(self.bnb_4bit_compute_dtype, torch.dtype):
            self.bnb_4bit_compute_dtype = str(self.bnb_4bit_compute_dtype).removeprefix("torch.")
        if self.load_in_8bit == self.load_in_4bit:
            raise ValueError("BitsAndBytesConfig: set exactly one of load_in_8bit and load_in_4bit")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(
                f"BitsAndBytesConfig: bnb_4bit_quant_type={self.bnb_4bit_quant_type!r}; expected 'nf4' or 'fp4'"
            )
        if not isinstance(getattr(torch, self.bnb_4bit_compute_dtype, None), torch.dtype):
            raise ValueError(
                f"BitsAndBytesConfig: bnb_4bit_compute_dtype={self.bnb_4bit_compute_dtype!r} is not a torch dtype"
            )

    @property
    def compute_dtype(self) -> torch.dtype:
        return getattr(torch, self.bnb_4bit_compute_dtype)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BitsAndBytesConfig:
        known = {k.lstrip("_"): v for k, v in values.items() if k.lstrip("_") in cls.__dataclass_fields__}
        return cls(**known)


def _targets(model: nn.Module, config: BitsAndBytesConfig) -> list[str]:
    names = quantizable_linears(model, config.llm_int8_skip_modules or ())
    if config.llm_int8_enable_fp32_cpu_offload and any(p.device.type == "cuda" for p in model.parameters()):
        # layers the device map put on the CPU stay in float32 there
        names = [n for n in names if model.get_submodule(n).weight.device.type != "cpu"]
    return names


def _empty_layer(bnb: Any, old: nn.Module, config: BitsAndBytesConfig) -> nn.Module:
    bias = old.bias is not None
    if config.load_in_8bit:
        return bnb.nn.Linear8bitLt(
            old.in_features, old.out_features, bias=bias, has_fp16_weights=config.llm_int8_has_fp16_weight,
            threshold=config.llm_int8_threshold, device="meta",
        )  # fmt: skip
    layer = bnb.nn.Linear4bit(
        old.in_features, old.out_features, bias=bias, compute_dtype=config.compute_dtype,
        compress_statistics=config.bnb_4bit_use_double_quant, quant_type=config.bnb_4bit_quant_type, device="meta",
    )  # fmt: skip
    # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights on the first inference call and unpacks
    # them to save, keeping the statistics in bf16 in between: every save would then lose precision and
    # a model would compute differently before and after saving. Keep the portable layout.
    layer.support_avx512bf16_for_cpu = False
    return layer


def quantize_bnb(model: nn.Module, config: BitsAndBytesConfig) -> nn.Module:
    """Quantize a loaded model's backbone linears in place; each layer quantizes where it lives."""
    bnb = require("bitsandbytes", _FEATURE)

    def make(_: str, old: nn.Module) -> nn.Module:
        layer = _empty_layer(bnb, old, config)
        weight = old.weight.detach()
        if config.load_in_8bit:
            layer.weight = bnb.nn.Int8Params(
                weight.clone(), requires_grad=False, has_fp16_weights=config.llm_int8_has_fp16_weight
            )
        else:
            layer.weight = bnb.nn.Params4bit(
                weight.clone(), requires_grad=False, quant_type=config.bnb_4bit_quant_type,
                compress_statistics=config.bnb_4bit_use_double_quant, module=layer,
            )  # fmt: skip
        if old.bias is not None:
            layer.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
        return layer.to(weight.device)  # moving to the device is what quantizes in bitsandbytes

    replace_modules(model, _targets(model, config), make)
    remember_quantization(model, config.to_dict())
    return model


def prepare_bnb(model: nn.Module, config: BitsAndBytesConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Build the bitsandbytes layers of a (meta-built) model from a quantized checkpoint's tensors,
    taking those tensors out of `tensors` so the rest of the model loads as usual."""
    bnb = require("bitsandbytes", _FEATURE)

    def make(name: str, old: nn.Module) -> nn.Module:
        layer = _empty_layer(bnb, old, config)
        own = {
            key[len(name) + 1 :]: tensors.pop(key) for key in [k for k in tensors if k.startswith(name + ".")]
        }
        if "weight" not in own:
            raise KeyError(f"quantized checkpoint: `{name}.weight` is missing")
        weight = own.pop("weight")
        if config.load_in_8bit:
            if "SCB" not in own:
                raise KeyError(f"quantized checkpoint: `{name}.SCB` (8-bit scales) is missing")
            layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
            layer.weight.CB, layer.weight.SCB = (
                layer.weight.data,
                own.pop("SCB").clone(),
            )  # as `.to()` leaves them
            own.pop("weight_format", None)
        else:
            stats = {k.removeprefix("weight."): v for k, v in own.items() if k.startswith("weight.")}
            layer.weight = bnb.nn.Params4bit.from_prequantized(
                data=weight.clone(),
                quantized_stats=stats,
                requires_grad=False,
                device=torch.device("cpu"),
                module=layer,
            )
        if "bias" in own:
            layer.bias = nn.Parameter(own.pop("bias").clone(), requires_grad=False)
        return layer

    replace_modules(model, _targets(model, config), make)
    remember_quantization(model, config.to_dict())
