"""What evaluation and training return, and how one evaluation's batches add up (over every rank)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class TrainOutput:
    global_step: int
    training_loss: float
    metrics: dict[str, float]


@dataclass
class PredictionOutput:
    predictions: torch.Tensor | tuple[torch.Tensor, ...] | None
    label_ids: torch.Tensor | None
    metrics: dict[str, float]


@dataclass
class EvalPrediction:
    predictions: torch.Tensor | tuple[torch.Tensor, ...]
    label_ids: torch.Tensor | None


class Predictions:
    """One evaluation's losses, predictions and labels, batch by batch."""

    def __init__(self) -> None:
        self.loss_sum, self.counted = 0.0, 0
        self.predictions: list[Any] = []
        self.labels: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor | None, prediction: Any, label: torch.Tensor | None, rows: int) -> None:
        if loss is not None:  # a batch's mean loss, weighted by its examples
            self.loss_sum, self.counted = self.loss_sum + float(loss) * rows, self.counted + rows
        self.predictions.append(prediction)
        if label is not None:
            self.labels.append(label)

    def result(
        self,
        prefix: str,
        compute_metrics: Callable[[EvalPrediction], dict[str, float]] | None,
        world_size: int,
    ) -> PredictionOutput:
        loss_sum, counted = self.loss_sum, self.counted
        if world_size > 1:  # every rank evaluated its share
            totals = torch.tensor([loss_sum, counted], dtype=torch.float64)
            dist.all_reduce(totals)
            loss_sum, counted = float(totals[0]), int(totals[1])
        metrics: dict[str, float] = {}
        if counted:
            metrics[f"{prefix}_loss"] = loss_sum / counted
        merged = _concat(self.predictions)
        labels = self.labels
        label_ids = torch.cat([t.cpu() for t in labels]) if labels and _same_tail(labels) else None
        if compute_metrics is not None and merged is not None:
            for key, value in compute_metrics(EvalPrediction(merged, label_ids)).items():
                metrics[key if key.startswith(f"{prefix}_") else f"{prefix}_{key}"] = float(value)
        return PredictionOutput(merged, label_ids, metrics)


def _same_tail(tensors: list[torch.Tensor]) -> bool:
    return all(t.shape[1:] == tensors[0].shape[1:] for t in tensors)


def _concat(parts: list[Any]) -> Any:
    if not parts or parts[0] is None:
        return None
    if isinstance(parts[0], tuple):
        return tuple(_concat([p[i] for p in parts]) for i in range(len(parts[0])))
    if _same_tail(parts):
        return torch.cat([p.detach().cpu() for p in parts])
    return [p.detach().cpu() for p in parts]  # ragged (per-token outputs of different lengths)
