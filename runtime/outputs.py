"""Model outputs: small dataclasses with the Hugging Face field names."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import Cache


@dataclass
class BaseModelOutput:
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None
    past_key_values: Cache | None = None


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None = None  # None from a training step with labels: only the loss is computed
    loss: torch.Tensor | None = None
    past_key_values: Cache | None = None


@dataclass
class SequenceClassifierOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: Cache | None = None


@dataclass
class TokenClassifierOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: Cache | None = None


@dataclass
class QuestionAnsweringOutput:
    start_logits: torch.Tensor
    end_logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: Cache | None = None


@dataclass
class MaskedLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


@dataclass
class MultipleChoiceOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


@dataclass
class LMAndMultipleChoiceOutput:
    """A language model's logits over each choice (batch, choices, length, vocab) and a score per choice."""

    logits: torch.Tensor
    mc_logits: torch.Tensor
    loss: torch.Tensor | None = None  # the language model's
    mc_loss: torch.Tensor | None = None
    past_key_values: Cache | None = None


@dataclass
class DenseEmbeddingOutput:
    """One vector per sequence, as DPR's question and context encoders produce."""

    pooler_output: torch.Tensor


@dataclass
class SpanReaderOutput:
    """Answer-span and passage-relevance scores, as DPR's reader produces."""

    start_logits: torch.Tensor
    end_logits: torch.Tensor
    relevance_logits: torch.Tensor
