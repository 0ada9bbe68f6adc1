"""specformer: transformer architectures written as declarative specs, generated into readable PyTorch.

The names code written for `transformers` reaches for live here, spelled as there:

    from specformer import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="bfloat16")
    out = model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=20)

Each name is imported on first use, so `import specformer` loads neither torch nor any optional package.
The layers underneath are `specformer.dsl` (the spec language), `specformer.codegen` (the generator),
`specformer.runtime` (what generated models share) and `specformer.generated.<arch>` (one per spec).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module under specformer that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        (
            "AutoConfig",
            "AutoModel",
            "AutoModelForCausalLM",
            "AutoModelForMaskedLM",
            "AutoModelForMultipleChoice",
            "AutoModelForQuestionAnswering",
            "AutoModelForSequenceClassification",
            "AutoModelForTokenClassification",
        ),
        "runtime.auto",
    ),
    "AutoTokenizer": "runtime.tokenizer",
    "PreTrainedTokenizerFast": "runtime.tokenizer",
    "PreTrainedModel": "runtime.modeling",
    "PretrainedConfig": "runtime.config",
    "GenerationConfig": "runtime.generation.config",
    "TextStreamer": "runtime.generation.streamers",
    "TextIteratorStreamer": "runtime.generation.streamers",
    "DynamicCache": "runtime.cache",
    "StaticCache": "runtime.cache",
    "BitsAndBytesConfig": "runtime.quantization",
    "WeightOnlyConfig": "runtime.quantization",
    **dict.fromkeys(
        (
            "Trainer",
            "TrainingArguments",
            "TrainerCallback",
            "EarlyStoppingCallback",
            "DataCollatorWithPadding",
            "DataCollatorForLanguageModeling",
            "DataCollatorForTokenClassification",
            "DefaultDataCollator",
            "EvalPrediction",
            "LoraConfig",
            "get_peft_model",
            "set_seed",
        ),
        "runtime.training",
    ),
    "SpecformerError": "runtime.errors",
    "pipeline": "runtime.pipelines",
    "Pipeline": "runtime.pipelines",
}

__all__ = [
    "AutoConfig",
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForMultipleChoice",
    "AutoModelForQuestionAnswering",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoTokenizer",
    "BitsAndBytesConfig",
    "DataCollatorForLanguageModeling",
    "DataCollatorForTokenClassification",
    "DataCollatorWithPadding",
    "DefaultDataCollator",
    "DynamicCache",
    "EarlyStoppingCallback",
    "EvalPrediction",
    "GenerationConfig",
    "LoraConfig",
    "Pipeline",
    "PreTrainedModel",
    "PreTrainedTokenizerFast",
    "PretrainedConfig",
    "SpecformerError",
    "StaticCache",
    "TextIteratorStreamer",
    "TextStreamer",
    "Trainer",
    "TrainerCallback",
    "TrainingArguments",
    "WeightOnlyConfig",
    "get_peft_model",
    "pipeline",
    "set_seed",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'specformer' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"specformer.{module}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from specformer.runtime.auto import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForMultipleChoice,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )
    from specformer.runtime.cache import DynamicCache, StaticCache
    from specformer.runtime.config import PretrainedConfig
    from specformer.runtime.errors import SpecformerError
    from specformer.runtime.generation.config import GenerationConfig
    from specformer.runtime.generation.streamers import TextIteratorStreamer, TextStreamer
    from specformer.runtime.modeling import PreTrainedModel
    from specformer.runtime.pipelines import Pipeline, pipeline
    from specformer.runtime.quantization import BitsAndBytesConfig, WeightOnlyConfig
    from specformer.runtime.tokenizer import AutoTokenizer, PreTrainedTokenizerFast
    from specformer.runtime.training import (
        DataCollatorForLanguageModeling,
        DataCollatorForTokenClassification,
        DataCollatorWithPadding,
        DefaultDataCollator,
        EarlyStoppingCallback,
        EvalPrediction,
        LoraConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        get_peft_model,
        set_seed,
    )
