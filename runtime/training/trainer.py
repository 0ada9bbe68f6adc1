"""Trainer: the training loop for any generated model, on one process or under torchrun (DDP / FSDP2).

The loop follows Hugging Face's Trainer so results line up: an optimizer step per
`gradient_accumulation_steps` batches, causal-LM losses normalised by the number of label tokens in the
whole accumulation window (and across ranks), gradient clipping, then the scheduler; logging, evaluation
and saving are decided by callbacks. Checkpoints hold everything needed to continue exactly where a run
stopped (weights, optimizer, scheduler, scaler, RNG states, position in the epoch) and are written to a
temporary directory that is renamed into place, so a crash mid-save leaves the previous one intact.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import save_state_dict
from ..losses import causal_lm_loss
from ..modeling import repeated_blocks
from .args import TrainingArguments
from .batches import batches_per_epoch, rank_batches
from .callbacks import (
    CallbackHandler,
    DefaultFlowCallback,
    ProgressCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)
from .checkpoints import (
    CHECKPOINT_PREFIX,
    checkpoints,
    dedupe,
    full_state_dict,
    load_weights,
    read_checkpoint,
    rotate,
    unwrap,
    write_checkpoint,
)
from .data import DefaultDataCollator
from .evaluation import EvalPrediction, PredictionOutput, Predictions, TrainOutput
from .optim import create_optimizer, create_scheduler
from .plot import write_loss_plot
from .reporting import Reporter

logger = logging.getLogger("specformer")


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments | None = None,
        data_collator: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None,
        train_dataset: Iterable[Any] | None = None,
        eval_dataset: Iterable[Any] | None = None,
        compute_metrics: Callable[[EvalPrediction], dict[str, float]] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, Any] = (None, None),
    ) -> None:
        self.args = args if args is not None else TrainingArguments()
        set_seed(self.args.seed)
        self.model = model
        self.data_collator = data_collator or DefaultDataCollator()
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.compute_metrics = compute_metrics
        self.optimizer, self.lr_scheduler = optimizers
        self.scaler: torch.amp.GradScaler | None = None
        self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world_size > 1 else 0
        self.state = TrainerState(is_world_process_zero=self.rank == 0, logging_steps=self.args.logging_steps)
        self.control = TrainerControl()
        default = [DefaultFlowCallback()] + ([] if self.args.disable_tqdm else [ProgressCallback()])
        self.callback_handler = CallbackHandler(default + list(callbacks or []))
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if self.args.tf32 is not None and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = self.args.tf32
        if self.args.gradient_checkpointing:
            unwrap(model).gradient_checkpointing_enable()
        forward = inspect.signature(unwrap(model).forward).parameters
        self._shifts_labels = "logits_to_keep" in forward  # causal LM heads: position t predicts t + 1
        # generated causal LMs divide their summed loss by it themselves, with the head's matmul fused in
        self._counts_items = "num_items_in_batch" in forward
        self._reporter = Reporter(self.args.report_to, Path(self.args.output_dir))
        self._resumed_at = 0  # the step a resumed run started from
        self._accumulating = 1  # batches in the current accumulation window
        self._fire("on_init_end")

    def add_callback(self, callback: TrainerCallback) -> None:
        self.callback_handler.add(callback)

    def _fire(self, event: str, **kwargs: Any) -> TrainerControl:
        return self.callback_handler.fire(
            event, self.args, self.state, self.control, model=self.model, **kwargs
        )

    def _batches(self, dataset: Iterable[Any], batch_size: int, shuffle_epoch: int | None) -> Iterator[dict]:
        return rank_batches(
            dataset, batch_size, self.data_collator, self.args, self.rank, self.world_size, shuffle_epoch
        )

    # ---- the steps users override -----------------------------------------------------------------
    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        if self.optimizer is None:
            self.optimizer = create_optimizer(self.model, self.args)
        if self.lr_scheduler is None:
            self.lr_scheduler = create_scheduler(self.optimizer, self.args, num_training_steps)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: int | None = None,
        return_outputs: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:  # fmt: skip
        """The training loss of one batch. Causal LMs: summed over label tokens and divided by the
        tokens of the whole accumulation window (all ranks), as Hugging Face's Trainer does."""
        labels = inputs.get("labels")
        if self._shifts_labels and labels is not None and num_items_in_batch is not None:
            if self._counts_items:
                outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
                loss = outputs.loss
            else:
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
                loss = causal_lm_loss(outputs.logits, labels, num_items_in_batch=num_items_in_batch)
            loss = loss * self.world_size  # DDP and FSDP average gradients over ranks
        else:
            outputs = model(**inputs)
            loss = outputs.loss
            if loss is None:
                raise ValueError(
                    f"{type(unwrap(model)).__name__} returned no loss: the batches need `labels` "
                    f"(got keys {sorted(inputs)}) or override Trainer.compute_loss"
                )
        return (loss, outputs) if return_outputs else loss

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: int | None = None
    ) -> torch.Tensor:
        model.train()
        with mixed_precision(self.args, self.device):
            loss = self.compute_loss(model, to_device(inputs, self.device), num_items_in_batch)
        if not (self._shifts_labels and num_items_in_batch is not None):
            loss = loss / self._accumulating  # a mean loss: average over the window's batches
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        return loss.detach()

    def prediction_step(
        self, model: nn.Module, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor | None, Any, torch.Tensor | None]:
        """(loss, predictions, labels) of one evaluation batch."""
        inputs = to_device(inputs, self.device)
        labels = inputs.get("labels")
        with torch.no_grad(), mixed_precision(self.args, self.device):
            outputs = model(**inputs)
        loss = getattr(outputs, "loss", None)
        prediction = getattr(outputs, "logits", None)
        if prediction is None:  # question answering: start and end logits
            prediction = tuple(
                getattr(outputs, n) for n in ("start_logits", "end_logits") if hasattr(outputs, n)
            )
        return (loss.detach() if loss is not None else None), prediction, labels

    # ---- training ---------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainOutput:
        args = self.args
        if self.train_dataset is None:
            raise ValueError("Trainer.train needs a train_dataset")
        per_epoch = batches_per_epoch(self.train_dataset, args, self.world_size)
        max_steps, steps_per_epoch, self.state.num_train_epochs = training_length(args, per_epoch)
        self.state.max_steps = max_steps
        model = wrap_for_training(self.model, self.args, self.world_size)
        self.create_optimizer_and_scheduler(max_steps)
        if args.fp16:
            self.scaler = torch.amp.GradScaler(self.device.type)
        resume = resume_from_checkpoint if resume_from_checkpoint is not None else args.resume_from_checkpoint
        if resume is True:
            resume = self.last_checkpoint()
        if resume:
            self._load_checkpoint(Path(resume))
        self._fire("on_train_begin")
        total_loss, logged_loss, logged_step = 0.0, 0.0, self.state.global_step
        # where a resumed run picks up: the epoch, and the batches of it already trained on
        done = self.state.global_step
        start_epoch, in_epoch = divmod(done, steps_per_epoch) if steps_per_epoch else (0, done)
        skip = in_epoch * args.gradient_accumulation_steps
        grad_norm: float | None = None
        for epoch in range(start_epoch, max(self.state.num_train_epochs, start_epoch + 1)):
            self._fire("on_epoch_begin")
            batches = self._batches(self.train_dataset, args.per_device_train_batch_size, epoch)
            for _ in range(skip):  # resuming mid-epoch: the batches already trained on
                next(batches, None)
            skip = 0
            while not self.control.should_training_stop:
                window = [b for _, b in zip(range(args.gradient_accumulation_steps), batches, strict=False)]
                if not window:
                    break
                self._fire("on_step_begin")
                self._accumulating = len(window)
                items = count_label_tokens(window, self.world_size) if self._shifts_labels else None
                step_loss = 0.0
                for index, batch in enumerate(window):
                    sync = index == len(window) - 1 or not isinstance(
                        model, nn.parallel.DistributedDataParallel
                    )
                    with contextlib.nullcontext() if sync else model.no_sync():
                        step_loss += float(self.training_step(model, batch, items))
                    if index < len(window) - 1:
                        self._fire("on_substep_end")
                self._fire("on_pre_optimizer_step")
                grad_norm = optimizer_step(model, self.optimizer, self.scaler, args.max_grad_norm)
                self._fire("on_optimizer_step")
                if not isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    self.lr_scheduler.step()
                model.zero_grad(set_to_none=True)
                total_loss += step_loss
                self.state.global_step += 1
                self.state.epoch = (
                    self.state.global_step / steps_per_epoch if steps_per_epoch else float(epoch)
                )
                self._fire("on_step_end")
                if self.control.should_log:
                    steps = self.state.global_step - logged_step
                    logs = {
                        "loss": mean_over_ranks(total_loss - logged_loss, self.world_size) / steps,
                        "learning_rate": self._learning_rate(),
                    }
                    if grad_norm is not None:
                        logs["grad_norm"] = grad_norm
                    self.log(logs)
                    logged_loss, logged_step = total_loss, self.state.global_step
                self._maybe_evaluate_and_save(model)
            if not self.control.should_training_stop:
                self._fire("on_epoch_end")
                self._maybe_evaluate_and_save(model)
            self.control.should_epoch_stop = False
            if self.control.should_training_stop or self.state.global_step >= max_steps:
                break
        if args.load_best_model_at_end and self.state.best_model_checkpoint:
            load_weights(self.model, Path(self.state.best_model_checkpoint))
        metrics = {"train_loss": total_loss / max(self.state.global_step - self._resumed_at, 1)}
        self._fire("on_train_end")
        if model is not self.model:  # a DDP/compile wrapper: let go of it (and the process group it holds)
            del model
            gc.collect()
        if args.plot and self.state.is_world_process_zero and self.state.log_history:
            write_loss_plot(Path(args.output_dir) / "loss_lr.png", self.state.log_history)
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    def _learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _maybe_evaluate_and_save(self, model: nn.Module) -> None:
        metrics = None
        if self.control.should_evaluate:
            self.control.should_evaluate = False
            metrics = self.evaluate()
            if isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.lr_scheduler.step(metrics[f"eval_{self.args.metric_for_best_model or 'loss'}"])
        if self.control.should_save:
            self.control.should_save = False
            self._save_checkpoint(model, metrics)

    def log(self, logs: dict[str, float]) -> None:
        logs = {**logs, "epoch": round(self.state.epoch, 4), "step": self.state.global_step}
        self.state.log_history.append(logs)
        if self.state.is_world_process_zero:
            self._reporter.write(logs)
        self.control.should_log = False
        self._fire("on_log", logs=logs)

    # ---- evaluation -------------------------------------------------------------------------------
    def _predict_loop(self, dataset: Iterable[Any], prefix: str) -> PredictionOutput:
        model = self.model
        model.eval()
        gathered = Predictions()
        for batch in self._batches(dataset, self.args.per_device_eval_batch_size, None):
            gathered.add(*self.prediction_step(model, batch), rows=len(next(iter(batch.values()))))
            self._fire("on_prediction_step")
        return gathered.result(prefix, self.compute_metrics, self.world_size)

    def evaluate(self, eval_dataset: Iterable[Any] | None = None) -> dict[str, float]:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("Trainer.evaluate needs an eval_dataset")
        metrics = self._predict_loop(dataset, "eval").metrics
        self.log(metrics)
        self._fire("on_evaluate", metrics=metrics)
        return metrics

    def predict(self, test_dataset: Iterable[Any]) -> PredictionOutput:
        output = self._predict_loop(test_dataset, "test")
        self._fire("on_predict", metrics=output.metrics)
        return output

    # ---- saving -----------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None) -> None:
        """The model alone (rank 0): a LoRA model's adapters, else `save_pretrained`."""
        directory = Path(output_dir or self.args.output_dir)
        state = full_state_dict(self.model)  # every rank takes part (FSDP gathers)
        if not self.state.is_world_process_zero:
            return
        model = unwrap(self.model)
        if hasattr(model, "lora_config"):
            from .lora import save_adapter

            save_adapter(model, directory)
        elif hasattr(model, "save_pretrained"):
            model.save_pretrained(directory)
        else:
            save_state_dict(dedupe(state), directory)
        self.args.save(directory / "training_args.json")

    def last_checkpoint(self) -> str | None:
        found = checkpoints(Path(self.args.output_dir))
        return str(found[-1]) if found else None

    def _save_checkpoint(self, model: nn.Module, metrics: dict[str, float] | None) -> None:
        args = self.args
        final = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{self.state.global_step}"
        if metrics is not None and args.metric_for_best_model is not None:
            value = metrics.get(f"eval_{args.metric_for_best_model}")
            best = self.state.best_metric
            if value is not None and (
                best is None or (value > best if args.greater_is_better else value < best)
            ):
                self.state.best_metric, self.state.best_model_checkpoint = value, str(final)
        state = full_state_dict(model)  # every rank takes part (FSDP gathers)
        if self.state.is_world_process_zero:
            write_checkpoint(final, state, self._checkpoint_parts(), self.state, args)
            rotate(final.parent, args.save_total_limit, self.state.best_model_checkpoint)
        if self.world_size > 1:
            dist.barrier()
        self._fire("on_save")

    def _checkpoint_parts(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "scheduler": self.lr_scheduler, "scaler": self.scaler}

    def _load_checkpoint(self, directory: Path) -> None:
        saved = read_checkpoint(directory, self.model, self._checkpoint_parts(), optional=("scaler",))
        saved.is_world_process_zero = self.state.is_world_process_zero
        self.state = saved
        self._resumed_at = saved.global_step


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def mixed_precision(args: TrainingArguments, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to bfloat16 or float16 when the arguments ask for it."""
    if not (args.bf16 or args.fp16):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if args.bf16 else torch.float16)


def training_length(args: TrainingArguments, batches_per_epoch: int | None) -> tuple[int, int | None, int]:
    """(optimizer steps in all, per epoch (None for an iterable dataset), epochs) of a run."""
    per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps) if batches_per_epoch else None
    if args.max_steps > 0:
        max_steps = args.max_steps
    elif per_epoch is not None:
        max_steps = math.ceil(args.num_train_epochs * per_epoch)
    else:
        raise ValueError("an iterable train_dataset has no length: set TrainingArguments.max_steps")
    epochs = math.ceil(max_steps / per_epoch) if per_epoch else int(args.num_train_epochs)
    return max_steps, per_epoch, epochs


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    max_grad_norm: float | None,
) -> float | None:
    """Unscale (fp16), clip and step; the gradient norm before clipping, when clipping."""
    grad_norm = None
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm and max_grad_norm > 0:
        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return grad_norm


def wrap_for_training(model: nn.Module, args: TrainingArguments, world_size: int) -> nn.Module:
    """DDP, or FSDP2 sharding each of the spec's repeated blocks, under torchrun; compiled if asked."""
    if world_size > 1:
        if args.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in repeated_blocks(model):  # the spec's repeated blocks are the wrap points
                fully_shard(block)
            fully_shard(model)
        else:
            model = nn.parallel.DistributedDataParallel(model)
    if args.torch_compile:
        model = torch.compile(model)
    return model


def count_label_tokens(window: list[dict[str, Any]], world_size: int) -> int | None:
    """Label tokens a causal LM predicts in an accumulation window, over every rank."""
    if "labels" not in window[0]:
        return None
    count = sum(int(b["labels"][..., 1:].ne(-100).sum()) for b in window)
    if world_size > 1:
        total = torch.tensor(count, dtype=torch.long)
        dist.all_reduce(total)
        count = int(total)
    return max(count, 1)


def mean_over_ranks(value: float, world_size: int) -> float:
    if world_size == 1:
        return value
    total = torch.tensor(value, dtype=torch.float64)
    dist.all_reduce(total)
    return float(total) / world_size


__all__ = ["Trainer", "set_seed"]
