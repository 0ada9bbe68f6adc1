"""Quantization: torch-native weight-only int8/int4 layers (`weight_only`) and bitsandbytes' 8-bit and
4-bit ones (`bnb`, an optional extra), chosen by the `quantization_config` a user passes or a checkpoint
saved. This module only dispatches; the layouts live below it and never import it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .bnb import BitsAndBytesConfig, prepare_bnb, quantize_bnb
from .modules import memory_footprint, quantizable_linears, remember_quantization, replace_modules
from .packed_embedding import PackedEmbedding
from .packed_experts import PackedExperts
from .weight_only import (
    QUANTIZED_LINEARS,
    Int4Linear,
    Int8Linear,
    WeightOnlyConfig,
    prepare_weight_only,
    quantize_weight_only,
    quantized_layers,
)

__all__ = [
    "QUANTIZED_LINEARS",
    "BitsAndBytesConfig",
    "Int4Linear",
    "Int8Linear",
    "PackedEmbedding",
    "PackedExperts",
    "WeightOnlyConfig",
    "is_quantized_layer",
    "memory_footprint",
    "prepare_quantized",
    "prepare_weight_only",
    "quantizable_linears",
    "quantization_config_from_dict",
    "quantize",
    "quantized_layers",
    "remember_quantization",
    "replace_modules",
]


def is_quantized_layer(module: nn.Module) -> bool:
    """An int8/int4 layer of ours or a bitsandbytes one (checked without importing bitsandbytes)."""
    return isinstance(module, QUANTIZED_LINEARS) or type(module).__module__.startswith("bitsandbytes")


def quantization_config_from_dict(values: dict[str, Any]) -> Any:
    """The config object a config.json's `quantization_config` describes."""
    method = values.get("quant_method")
    if method == "weight_only":
        return WeightOnlyConfig.from_dict(values)
    if method == "bitsandbytes":
        return BitsAndBytesConfig.from_dict(values)
    raise ValueError(
        f"quantization_config: quant_method `{method}` is unknown; expected weight_only or bitsandbytes"
    )


def quantize(model: nn.Module, config: Any) -> nn.Module:
    """Quantize a loaded full-precision model in place with `config` (an object or its dict)."""
    config = quantization_config_from_dict(config) if isinstance(config, dict) else config
    if isinstance(config, WeightOnlyConfig):
        return quantize_weight_only(model, config)
    if isinstance(config, BitsAndBytesConfig):
        return quantize_bnb(model, config)
    raise TypeError(
        f"quantization_config: expected WeightOnlyConfig or BitsAndBytesConfig, got {type(config).__name__}"
    )


def prepare_quantized(model: nn.Module, saved: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Give a meta-built model the quantized layers a checkpoint saved with `saved` holds."""
    config = quantization_config_from_dict(saved)
    if isinstance(config, WeightOnlyConfig):
        prepare_weight_only(model, config, quantized_layers(tensors))
        return
    prepare_bnb(model, config, tensors)
