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
import json
import logging
import math
import os
import random
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import checkpoint_files, iter_tensors, save_state_dict
from ..losses import causal_lm_loss
from ..modeling import repeated_blocks
from .args import TrainingArguments
from .callbacks import (
    CallbackHandler,
    DefaultFlowCallback,
    ProgressCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)
from .data import DefaultDataCollator
from .optim import create_optimizer, create_scheduler
from .plot import write_loss_plot

logger = logging.getLogger("specformer")
CHECKPOINT_PREFIX = "checkpoint"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")


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


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed)


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


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
            _unwrap(model).gradient_checkpointing_enable()
        forward = inspect.signature(_unwrap(model).forward).parameters
        self._shifts_labels = "logits_to_keep" in forward  # causal LM heads: position t predicts t + 1
        # generated causal LMs divide their summed loss by it themselves, with the head's matmul fused in
        self._counts_items = "num_items_in_batch" in forward
        self._reporter = None
        self._resumed_at = 0  # the step a resumed run started from
        self._accumulating = 1  # batches in the current accumulation window
        self._fire("on_init_end")

    def add_callback(self, callback: TrainerCallback) -> None:
        self.callback_handler.add(callback)

    def _fire(self, event: str, **kwargs: Any) -> TrainerControl:
        return self.callback_handler.fire(
            event, self.args, self.state, self.control, model=self.model, **kwargs
        )

    # ---- data -------------------------------------------------------------------------------------
    def _batches(self, dataset: Iterable[Any], batch_size: int, shuffle_epoch: int | None) -> Iterator[dict]:
        """This rank's batches: a seeded permutation per epoch (or the dataset order), split over ranks."""
        if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
            order = list(range(len(dataset)))  # type: ignore[arg-type]
            if shuffle_epoch is not None and self.args.train_sampling_strategy == "random":
                generator = torch.Generator().manual_seed(self.args.seed + shuffle_epoch)
                order = torch.randperm(len(order), generator=generator).tolist()
            if self.world_size > 1 and shuffle_epoch is not None:  # every rank gets as many batches
                order += order[: -len(order) % self.world_size]
            order = order[self.rank :: self.world_size]
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=batch_size, sampler=order, collate_fn=self.data_collator,  # type: ignore[arg-type]
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
                drop_last=self.args.dataloader_drop_last,
            )  # fmt: skip
            yield from loader
            return
        buffer: list[Any] = []
        for index, example in enumerate(dataset):  # an iterable dataset: its own order
            if index % self.world_size != self.rank:
                continue
            buffer.append(example)
            if len(buffer) == batch_size:
                yield self.data_collator(buffer)
                buffer = []
        if buffer and not self.args.dataloader_drop_last:
            yield self.data_collator(buffer)

    def _batches_per_epoch(self) -> int | None:
        dataset = self.train_dataset
        if not hasattr(dataset, "__len__"):
            return None
        per_rank = math.ceil(len(dataset) / self.world_size)  # type: ignore[arg-type]
        size = self.args.per_device_train_batch_size
        return per_rank // size if self.args.dataloader_drop_last else math.ceil(per_rank / size)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ---- the steps users override -----------------------------------------------------------------
    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        if self.optimizer is None:
            self.optimizer = create_optimizer(self.model, self.args)
        if self.lr_scheduler is None:
            self.lr_scheduler = create_scheduler(self.optimizer, self.args, num_training_steps)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not (self.args.bf16 or self.args.fp16):
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

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
                    f"{type(_unwrap(model)).__name__} returned no loss: the batches need `labels` "
                    f"(got keys {sorted(inputs)}) or override Trainer.compute_loss"
                )
        return (loss, outputs) if return_outputs else loss

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: int | None = None
    ) -> torch.Tensor:
        model.train()
        with self._autocast():
            loss = self.compute_loss(model, self._to_device(inputs), num_items_in_batch)
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
        inputs = self._to_device(inputs)
        labels = inputs.get("labels")
        with torch.no_grad(), self._autocast():
            outputs = model(**inputs)
        loss = getattr(outputs, "loss", None)
        prediction = getattr(outputs, "logits", None)
        if prediction is None:  # question answering: start and end logits
            prediction = tuple(
                getattr(outputs, n) for n in ("start_logits", "end_logits") if hasattr(outputs, n)
            )
        return (loss.detach() if loss is not None else None), prediction, labels

    # ---- training ---------------------------------------------------------------------------------
    def _wrap_distributed(self) -> nn.Module:
        model = self.model
        if self.world_size > 1:
            if self.args.fsdp:
                from torch.distributed.fsdp import fully_shard

                for block in repeated_blocks(model):  # the spec's repeated blocks are the wrap points
                    fully_shard(block)
                fully_shard(model)
            else:
                model = nn.parallel.DistributedDataParallel(model)
        if self.args.torch_compile:
            model = torch.compile(model)
        return model

    def _count_items(self, window: list[dict[str, Any]]) -> int | None:
        if not self._shifts_labels or "labels" not in window[0]:
            return None
        count = sum(int(b["labels"][..., 1:].ne(-100).sum()) for b in window)
        if self.world_size > 1:
            total = torch.tensor(count, dtype=torch.long)
            dist.all_reduce(total)
            count = int(total)
        return max(count, 1)

    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainOutput:
        args = self.args
        if self.train_dataset is None:
            raise ValueError("Trainer.train needs a train_dataset")
        per_epoch = self._batches_per_epoch()
        steps_per_epoch = math.ceil(per_epoch / args.gradient_accumulation_steps) if per_epoch else None
        if args.max_steps > 0:
            max_steps = args.max_steps
        elif steps_per_epoch is not None:
            max_steps = math.ceil(args.num_train_epochs * steps_per_epoch)
        else:
            raise ValueError("an iterable train_dataset has no length: set TrainingArguments.max_steps")
        self.state.max_steps = max_steps
        self.state.num_train_epochs = (
            math.ceil(max_steps / steps_per_epoch) if steps_per_epoch else int(args.num_train_epochs)
        )
        model = self._wrap_distributed()
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
                items = self._count_items(window)
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
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                if args.max_grad_norm and args.max_grad_norm > 0:
                    grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm))
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
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
                        "loss": self._mean_over_ranks(total_loss - logged_loss) / steps,
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
            self._load_weights(Path(self.state.best_model_checkpoint))
        metrics = {"train_loss": total_loss / max(self.state.global_step - self._resumed_at, 1)}
        self._fire("on_train_end")
        if model is not self.model:  # a DDP/compile wrapper: let go of it (and the process group it holds)
            del model
            gc.collect()
        if args.plot and self.state.is_world_process_zero and self.state.log_history:
            write_loss_plot(Path(args.output_dir) / "loss_lr.png", self.state.log_history)
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    def _mean_over_ranks(self, value: float) -> float:
        if self.world_size == 1:
            return value
        total = torch.tensor(value, dtype=torch.float64)
        dist.all_reduce(total)
        return float(total) / self.world_size

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
            self._report(logs)
        self.control.should_log = False
        self._fire("on_log", logs=logs)

    def _report(self, logs: dict[str, float]) -> None:
        if self.args.report_to == "jsonl":
            path = Path(self.args.output_dir) / "logs.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as handle:
                handle.write(json.dumps(logs) + "\n")
        elif self.args.report_to == "tensorboard":
            if self._reporter is None:
                from ..hardware import require

                require("tensorboard", "report_to='tensorboard'")
                from torch.utils.tensorboard import SummaryWriter

                self._reporter = SummaryWriter(str(Path(self.args.output_dir) / "runs"))
            for key, value in logs.items():
                if key != "step":
                    self._reporter.add_scalar(key, value, logs["step"])

    # ---- evaluation -------------------------------------------------------------------------------
    def _predict_loop(self, dataset: Iterable[Any], prefix: str) -> PredictionOutput:
        model = self.model
        model.eval()
        loss_sum, counted, predictions, labels = 0.0, 0, [], []
        for batch in self._batches(dataset, self.args.per_device_eval_batch_size, None):
            loss, prediction, label = self.prediction_step(model, batch)
            self._fire("on_prediction_step")
            if loss is not None:  # a batch's mean loss, weighted by its examples
                rows = len(next(iter(batch.values())))
                loss_sum, counted = loss_sum + float(loss) * rows, counted + rows
            predictions.append(prediction)
            if label is not None:
                labels.append(label)
        if self.world_size > 1:  # every rank evaluated its share
            totals = torch.tensor([loss_sum, counted], dtype=torch.float64)
            dist.all_reduce(totals)
            loss_sum, counted = float(totals[0]), int(totals[1])
        metrics: dict[str, float] = {}
        if counted:
            metrics[f"{prefix}_loss"] = loss_sum / counted
        merged = _concat(predictions)
        label_ids = torch.cat([t.cpu() for t in labels]) if labels and _same_tail(labels) else None
        if self.compute_metrics is not None and merged is not None:
            for key, value in self.compute_metrics(EvalPrediction(merged, label_ids)).items():
                metrics[key if key.startswith(f"{prefix}_") else f"{prefix}_{key}"] = float(value)
        return PredictionOutput(merged, label_ids, metrics)

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
        state = _full_state_dict(self.model)  # every rank takes part (FSDP gathers)
        if not self.state.is_world_process_zero:
            return
        model = _unwrap(self.model)
        if hasattr(model, "lora_config"):
            from .lora import save_adapter

            save_adapter(model, directory)
        elif hasattr(model, "save_pretrained"):
            model.save_pretrained(directory)
        else:
            save_state_dict(_dedupe(state), directory)
        self.args.save(directory / "training_args.json")

    def last_checkpoint(self) -> str | None:
        found = _checkpoints(Path(self.args.output_dir))
        return str(found[-1]) if found else None

    def _save_checkpoint(self, model: nn.Module, metrics: dict[str, float] | None) -> None:
        args = self.args
        root = Path(args.output_dir)
        final = root / f"{CHECKPOINT_PREFIX}-{self.state.global_step}"
        if metrics is not None and args.metric_for_best_model is not None:
            value = metrics.get(f"eval_{args.metric_for_best_model}")
            best = self.state.best_metric
            if value is not None and (
                best is None or (value > best if args.greater_is_better else value < best)
            ):
                self.state.best_metric, self.state.best_model_checkpoint = value, str(final)
        state = _full_state_dict(model)  # every rank takes part (FSDP gathers)
        if self.state.is_world_process_zero:
            tmp = root / f".{final.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_state_dict(_dedupe(state), tmp)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.lr_scheduler.state_dict(), tmp / "scheduler.pt")
            if self.scaler is not None:
                torch.save(self.scaler.state_dict(), tmp / "scaler.pt")
            torch.save(_rng_state(), tmp / "rng_state.pt")
            self.state.save_to_json(tmp / "trainer_state.json")
            args.save(tmp / "training_args.json")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # the commit point: a crash before it leaves the last checkpoint as it was
            self._rotate(root)
        if self.world_size > 1:
            dist.barrier()
        self._fire("on_save")

    def _rotate(self, root: Path) -> None:
        limit = self.args.save_total_limit
        if limit is None or limit <= 0:
            return
        found = _checkpoints(root)
        best = Path(self.state.best_model_checkpoint) if self.state.best_model_checkpoint else None
        removable = [c for c in found if best is None or c.resolve() != best.resolve()]
        keep = limit - (1 if best is not None and best in found else 0)
        for old in removable[: max(len(removable) - max(keep, 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)

    def _load_weights(self, directory: Path) -> None:
        state = dict(iter_tensors(checkpoint_files(directory)))
        model = _unwrap(self.model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        shared = _shared_names(model)
        missing = [k for k in missing if k not in shared]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {directory} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )

    def _load_checkpoint(self, directory: Path) -> None:
        if not (directory / "trainer_state.json").exists():
            raise FileNotFoundError(f"{directory} is not a trainer checkpoint (no trainer_state.json)")
        self._load_weights(directory)
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
        if self.scaler is not None and (directory / "scaler.pt").exists():
            self.scaler.load_state_dict(torch.load(directory / "scaler.pt", weights_only=True))
        saved = TrainerState.load_from_json(directory / "trainer_state.json")
        saved.is_world_process_zero = self.state.is_world_process_zero
        self.state = saved
        self._resumed_at = saved.global_step
        _set_rng_state(torch.load(directory / "rng_state.pt", weights_only=True))


def _full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    inner = _unwrap(model)
    if any(type(p).__name__ == "DTensor" for p in inner.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return inner.state_dict()


def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop second names of shared tensors (tied weights): safetensors stores each tensor once."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident in seen and tensor.numel() > 0:
            continue
        seen.add(ident)
        out[key] = tensor
    return out


def _shared_names(model: nn.Module) -> set[str]:
    state = model.state_dict()
    return set(state) - set(_dedupe(state))


def _checkpoints(root: Path) -> list[Path]:
    if not root.exists():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    with contextlib.suppress(ImportError):
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


__all__ = ["EvalPrediction", "PredictionOutput", "TrainOutput", "Trainer", "set_seed"]
