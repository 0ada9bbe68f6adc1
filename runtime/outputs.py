"""Model outputs: dataclasses with Hugging Face's field names, in its order, and its ModelOutput access:
by attribute, by key (`out["logits"]`) and by position (`out[0]`), where fields that are None do not
count, so `out[0]` is the loss when labels were given and the logits otherwise, as in transformers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch

from .cache import Cache

Tensors = tuple[torch.Tensor, ...]


class ModelOutput:
    """transformers' ModelOutput conventions, for the dataclasses below."""

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]  # type: ignore[arg-type]

    def values(self) -> list[Any]:
        return [getattr(self, name) for name in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(name, getattr(self, name)) for name in self.keys()]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    @property
    def cache(self) -> Cache | None:
        """transformers 5's name for `past_key_values`."""
        return getattr(self, "past_key_values", None)

    def __getitem__(self, key: str | int | slice) -> Any:
        if key == "cache":
            key = "past_key_values"
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"{type(self).__name__} has no {key!r} (fields set: {', '.join(self.keys())})")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __len__(self) -> int:
        return len(self.keys())


@dataclass(eq=False)
class BaseModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: Tensors | None = None  # the embeddings' output, then each layer's (`output_hidden_states`)
    attentions: Tensors | None = None
    router_logits: Tensors | None = None  # each routing layer's (tokens, experts) (`output_router_logits`)


@dataclass(eq=False)
class CausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # a mixture of experts' load-balancing loss, included in `loss`
    logits: torch.Tensor | None = None  # None from a training step with labels: only the loss is computed
    past_key_values: Cache | None = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None
    router_logits: Tensors | None = None


@dataclass(eq=False)
class SequenceClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None


@dataclass(eq=False)
class TokenClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None


@dataclass(eq=False)
class QuestionAnsweringOutput(ModelOutput):
    loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None


@dataclass(eq=False)
class MaskedLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None


@dataclass(eq=False)
class MultipleChoiceOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None


@dataclass(eq=False)
class LMAndMultipleChoiceOutput(ModelOutput):
    """A language model's logits over each choice (batch, choices, length, vocab) and a score per choice."""

    loss: torch.Tensor | None = None  # the language model's
    mc_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mc_logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None


@dataclass(eq=False)
class DenseEmbeddingOutput(ModelOutput):
    """One vector per sequence, as DPR's question and context encoders produce."""

    pooler_output: torch.Tensor | None = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None


@dataclass(eq=False)
class SpanReaderOutput(ModelOutput):
    """Answer-span and passage-relevance scores, as DPR's reader produces."""

    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    relevance_logits: torch.Tensor | None = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None
