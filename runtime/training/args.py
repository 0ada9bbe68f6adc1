"""TrainingArguments: Hugging Face's names and defaults for the settings a training run needs."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..files import atomic_write_text

SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "reduce_lr_on_plateau",
)
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd", "adafactor", "adamw_bnb_8bit")
STRATEGIES = ("no", "steps", "epoch")
REPORTERS = ("none", "jsonl", "tensorboard")


@dataclass
class TrainingArguments:
    output_dir: str = "trainer_output"
    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "linear"
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    optim: str = "adamw_torch_fused"  # transformers' default too: one kernel per tensor for the whole update
    bf16: bool = False
    fp16: bool = False
    tf32: bool | None = None
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    logging_steps: int = 500
    eval_strategy: str = "no"
    eval_steps: int | None = None
    save_strategy: str = "steps"
    save_steps: int = 500
    save_total_limit: int | None = None
    load_best_model_at_end: bool = False
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    seed: int = 42
    dataloader_num_workers: int = 0
    dataloader_pin_memory: bool = True
    dataloader_drop_last: bool = False
    train_sampling_strategy: str = "random"  # or "sequential"
    report_to: str = "none"
    resume_from_checkpoint: str | None = None
    disable_tqdm: bool = False
    plot: bool = True  # write loss_lr.png to output_dir at the end
    fsdp: bool = False  # under torchrun: FSDP2 (fully_shard per block) instead of DDP
    deepspeed: str | dict[str, Any] | None = None  # not supported: refused with what to use instead

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"TrainingArguments: `{name}` is {getattr(self, name)!r}; expected {expected}")

        for name, choices in (
            ("lr_scheduler_type", SCHEDULERS),
            ("optim", OPTIMIZERS),
            ("eval_strategy", STRATEGIES),
            ("save_strategy", STRATEGIES),
            ("report_to", REPORTERS),
            ("train_sampling_strategy", ("random", "sequential")),
        ):
            if getattr(self, name) not in choices:
                raise bad(name, "one of " + ", ".join(choices))
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
        ):
            if getattr(self, name) < 1:
                raise bad(name, "an integer >= 1")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise bad("num_train_epochs", "> 0 (or max_steps > 0)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise bad("warmup_ratio", "a fraction in [0, 1)")
        if self.deepspeed is not None:
            from importlib.util import find_spec

            missing = "DeepSpeed is not installed, and " if find_spec("deepspeed") is None else ""
            raise ValueError(
                f"TrainingArguments: `deepspeed` is set, but {missing}specformer's Trainer has no DeepSpeed "
                "integration; under torchrun, fsdp=True shards parameters, gradients and optimizer state "
                "(as ZeRO-3 does) with torch alone"
            )
        if self.bf16 and self.fp16:
            raise ValueError("TrainingArguments: choose one of bf16 and fp16")
        if self.eval_strategy == "steps" and self.eval_steps is None:
            self.eval_steps = self.logging_steps
        if self.load_best_model_at_end:
            if self.eval_strategy == "no":
                raise ValueError("TrainingArguments: load_best_model_at_end needs an eval_strategy")
            if self.save_strategy != self.eval_strategy:
                raise ValueError(
                    "TrainingArguments: load_best_model_at_end needs save_strategy == eval_strategy "
                    f"(got {self.save_strategy!r} and {self.eval_strategy!r})"
                )
        if self.metric_for_best_model is None and self.load_best_model_at_end:
            self.metric_for_best_model = "loss"
        if self.metric_for_best_model is not None:
            self.metric_for_best_model = self.metric_for_best_model.removeprefix("eval_")
            if self.greater_is_better is None:
                self.greater_is_better = not self.metric_for_best_model.endswith("loss")

    # ---- derived ------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def process_index(self) -> int:
        return int(os.environ.get("RANK", "0"))

    def warmup_for(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps > 0 else int(self.warmup_ratio * total_steps + 0.999999)

    # ---- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.to_json_string())

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingArguments:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainingArguments: unknown fields {unknown}")
        return cls(**values)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> TrainingArguments:
        return cls.from_dict(json.loads(Path(path).read_text()))
