"""Optimizers and learning-rate schedules, with Hugging Face's formulas so loss curves match."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from ..layers import RMSNorm
from .args import TrainingArguments


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Parameters that get weight decay: everything but biases and normalisation weights."""
    norms = (nn.LayerNorm, RMSNorm, nn.GroupNorm)
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, norms):
            continue
        for name, _ in module.named_parameters(recurse=False):
            if name != "bias":
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


def create_optimizer(model: nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    decay = decay_parameter_names(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    adam = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    if args.optim == "adamw_torch":
        return torch.optim.AdamW(groups, **adam)
    if args.optim == "adamw_torch_fused":
        return torch.optim.AdamW(groups, **adam, fused=True)
    if args.optim == "sgd":
        return torch.optim.SGD(groups, lr=args.learning_rate)
    if args.optim == "adafactor":
        return torch.optim.Adafactor(groups, lr=args.learning_rate)
    from ..hardware import require

    bnb = require("bitsandbytes", "optim='adamw_bnb_8bit'")
    return bnb.optim.AdamW8bit(groups, **adam)


def _warmup(step: int, warmup: int) -> float | None:
    return step / max(1, warmup) if step < warmup else None


def _linear(step: int, warmup: int, total: int) -> float:
    w = _warmup(step, warmup)
    return w if w is not None else max(0.0, (total - step) / max(1, total - warmup))


def _cosine(step: int, warmup: int, total: int, cycles: float = 0.5) -> float:
    w = _warmup(step, warmup)
    if w is not None:
        return w
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * cycles * 2.0 * progress)))


def _cosine_restarts(step: int, warmup: int, total: int, cycles: int = 1) -> float:
    w = _warmup(step, warmup)
    if w is not None:
        return w
    progress = (step - warmup) / max(1, total - warmup)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))


def _polynomial(
    step: int, warmup: int, total: int, lr_init: float, lr_end: float = 1e-7, power: float = 1.0
) -> float:
    w = _warmup(step, warmup)
    if w is not None:
        return w
    if step > total:
        return lr_end / lr_init
    remaining = 1 - (step - warmup) / max(1, total - warmup)
    return ((lr_init - lr_end) * remaining**power + lr_end) / lr_init


def _constant_with_warmup(step: int, warmup: int) -> float:
    w = _warmup(step, warmup)
    return 1.0 if w is None else w


def create_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments, total_steps: int) -> object:
    """The schedule `args.lr_scheduler_type` names; ReduceLROnPlateau steps on evaluation metrics."""
    warmup, extra = args.warmup_for(total_steps), dict(args.lr_scheduler_kwargs)
    kind = args.lr_scheduler_type
    if kind == "reduce_lr_on_plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **extra)
    lambdas = {
        "linear": partial(_linear, warmup=warmup, total=total_steps),
        "cosine": partial(_cosine, warmup=warmup, total=total_steps, **extra),
        "cosine_with_restarts": partial(_cosine_restarts, warmup=warmup, total=total_steps, **extra),
        "polynomial": partial(
            _polynomial, warmup=warmup, total=total_steps, lr_init=args.learning_rate, **extra
        ),
        "constant": lambda _: 1.0,
        "constant_with_warmup": partial(_constant_with_warmup, warmup=warmup),
    }
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas[kind])
