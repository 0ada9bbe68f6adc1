"""Model outputs: small dataclasses with the Hugging Face field names."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import Cache


@dataclass
class BaseModelOutput:
    last_hidden_state: torch.Tensor
    past_key_values: Cache | None = None


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: Cache | None = None


@dataclass
class SequenceClassifierOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: Cache | None = None
