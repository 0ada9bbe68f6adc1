"""Training: arguments, data collators, the Trainer and its callbacks, LoRA adapters."""

from .args import TrainingArguments
from .callbacks import (
    DefaultFlowCallback,
    EarlyStoppingCallback,
    PrinterCallback,
    ProgressCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)
from .data import (
    DataCollatorForLanguageModeling,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    DefaultDataCollator,
)
from .evaluation import EvalPrediction, PredictionOutput, TrainOutput
from .lora import LoraConfig, get_peft_model, load_adapter, merge_and_unload, save_adapter
from .trainer import Trainer, set_seed

__all__ = [
    "DataCollatorForLanguageModeling",
    "DataCollatorForTokenClassification",
    "DataCollatorWithPadding",
    "DefaultDataCollator",
    "DefaultFlowCallback",
    "EarlyStoppingCallback",
    "EvalPrediction",
    "LoraConfig",
    "PredictionOutput",
    "PrinterCallback",
    "ProgressCallback",
    "TrainOutput",
    "Trainer",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "TrainingArguments",
    "get_peft_model",
    "load_adapter",
    "merge_and_unload",
    "save_adapter",
    "set_seed",
]
