"""Data collators: lists of examples (dicts of lists or tensors) to padded batches of tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..losses import IGNORE_INDEX

Example = Mapping[str, Any]


def _tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.tensor(value)


def _pad(rows: Sequence[Any], value: int, side: str, multiple: int | None = None) -> torch.Tensor:
    rows = [_tensor(r) for r in rows]
    length = max(len(r) for r in rows)
    if multiple:
        length = -(-length // multiple) * multiple
    out = torch.full((len(rows), length), value, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        if side == "left":
            out[i, length - len(row) :] = row
        else:
            out[i, : len(row)] = row
    return out


class DefaultDataCollator:
    """Stacks equal-length fields; `label`/`label_ids` become `labels`."""

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        batch = {}
        for key in examples[0]:
            name = "labels" if key in ("label", "label_ids") else key
            values = [e[key] for e in examples]
            if isinstance(values[0], str):
                continue
            batch[name] = torch.stack([_tensor(v) for v in values])
        return batch


@dataclass
class DataCollatorWithPadding:
    """Pads `input_ids`, `attention_mask`, `token_type_ids` to the longest example (or a multiple)."""

    pad_token_id: int = 0
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        batch = {}
        for key in examples[0]:
            values = [e[key] for e in examples]
            name = "labels" if key in ("label", "label_ids") else key
            if key == "input_ids":
                batch[name] = _pad(values, self.pad_token_id, self.padding_side, self.pad_to_multiple_of)
            elif key in ("attention_mask", "token_type_ids", "special_tokens_mask"):
                batch[name] = _pad(values, 0, self.padding_side, self.pad_to_multiple_of)
            elif not isinstance(values[0], str):
                batch[name] = torch.stack([_tensor(v) for v in values])
        if "attention_mask" not in batch and "input_ids" in batch:
            lengths = [len(e["input_ids"]) for e in examples]
            ones = [[1] * n for n in lengths]
            batch["attention_mask"] = _pad(ones, 0, self.padding_side, self.pad_to_multiple_of)
        return batch


@dataclass
class DataCollatorForLanguageModeling:
    """Causal (`mlm=False`: labels are the inputs, padding ignored) or masked language modelling: a
    `mlm_probability` share of tokens is chosen, of which 80 % become `mask_token_id`, 10 % a random
    token and 10 % stay; only chosen tokens are labelled."""

    pad_token_id: int = 0
    mlm: bool = True
    mlm_probability: float = 0.15
    mask_token_id: int | None = None
    vocab_size: int | None = None
    special_token_ids: tuple[int, ...] = ()
    padding_side: str = "right"
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.mlm and (self.mask_token_id is None or self.vocab_size is None):
            raise ValueError("DataCollatorForLanguageModeling: mlm=True needs mask_token_id and vocab_size")

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        batch = DataCollatorWithPadding(self.pad_token_id, self.padding_side)(
            [{k: v for k, v in e.items() if k != "labels"} for e in examples]
        )
        ids = batch["input_ids"]
        if not self.mlm:
            batch["labels"] = ids.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
            return batch
        special = batch["attention_mask"] == 0
        for token in self.special_token_ids:
            special |= ids == token
        probability = torch.full(ids.shape, self.mlm_probability).masked_fill(special, 0.0)
        chosen = torch.bernoulli(probability, generator=self.generator).bool()
        labels = ids.masked_fill(~chosen, IGNORE_INDEX)
        masked = torch.bernoulli(torch.full(ids.shape, 0.8), generator=self.generator).bool() & chosen
        randomised = (
            torch.bernoulli(torch.full(ids.shape, 0.5), generator=self.generator).bool() & chosen & ~masked
        )
        assert self.mask_token_id is not None and self.vocab_size is not None
        ids = ids.masked_fill(masked, self.mask_token_id)
        random_tokens = torch.randint(self.vocab_size, ids.shape, generator=self.generator)
        batch["input_ids"] = torch.where(randomised, random_tokens, ids)
        batch["labels"] = labels
        return batch


@dataclass
class DataCollatorForTokenClassification:
    """Pads inputs like DataCollatorWithPadding and per-token `labels` with -100."""

    pad_token_id: int = 0
    padding_side: str = "right"
    label_pad_token_id: int = IGNORE_INDEX

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        labels = [e["labels"] for e in examples] if "labels" in examples[0] else None
        batch = DataCollatorWithPadding(self.pad_token_id, self.padding_side)(
            [{k: v for k, v in e.items() if k != "labels"} for e in examples]
        )
        if labels is not None:
            width = batch["input_ids"].shape[1]
            padded = _pad(labels, self.label_pad_token_id, self.padding_side)
            if padded.shape[1] < width:
                extra = torch.full((len(labels), width - padded.shape[1]), self.label_pad_token_id)
                padded = torch.cat(
                    (padded, extra) if self.padding_side == "right" else (extra, padded), dim=1
                )
            batch["labels"] = padded
        return batch
