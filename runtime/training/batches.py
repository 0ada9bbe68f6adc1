"""Batches for one rank: a seeded permutation per epoch (or the dataset's own order), split over ranks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .args import TrainingArguments


def rank_batches(
    dataset: Iterable[Any],
    batch_size: int,
    collate: Callable[[list[Any]], dict[str, Any]],
    args: TrainingArguments,
    rank: int,
    world_size: int,
    shuffle_epoch: int | None,
) -> Iterator[dict]:
    """This rank's batches; `shuffle_epoch` seeds the permutation (None: the dataset's order)."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        order = list(range(len(dataset)))  # type: ignore[arg-type]
        if shuffle_epoch is not None and args.train_sampling_strategy == "random":
            generator = torch.Generator().manual_seed(args.seed + shuffle_epoch)
            order = torch.randperm(len(order), generator=generator).tolist()
        if world_size > 1 and shuffle_epoch is not None:  # every rank gets as many batches
            order += order[: -len(order) % world_size]
        order = order[rank::world_size]
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=order, collate_fn=collate,  # type: ignore[arg-type]
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
            drop_last=args.dataloader_drop_last,
        )  # fmt: skip
        yield from loader
        return
    buffer: list[Any] = []
    for index, example in enumerate(dataset):  # an iterable dataset: its own order
        if index % world_size != rank:
            continue
        buffer.append(example)
        if len(buffer) == batch_size:
            yield collate(buffer)
            buffer = []
    if buffer and not args.dataloader_drop_last:
        yield collate(buffer)


def batches_per_epoch(dataset: Iterable[Any], args: TrainingArguments, world_size: int) -> int | None:
    """Training batches each rank sees per epoch, or None for a dataset without a length."""
    if not hasattr(dataset, "__len__"):
        return None
    per_rank = math.ceil(len(dataset) / world_size)  # type: ignore[arg-type]
    size = args.per_device_train_batch_size
    return per_rank // size if args.dataloader_drop_last else math.ceil(per_rank / size)
