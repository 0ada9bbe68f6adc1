"""What every generated architecture shares: configs, checkpoints, attention, rotary tables, caches, losses."""

from .attention import ATTENTION_BACKENDS, AttentionMask, attend, register_attention
from .auto import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from .cache import Cache, DynamicCache
from .checkpoint import CheckpointError
from .config import ConfigError, PretrainedConfig
from .modeling import PreTrainedModel

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionMask",
    "AutoConfig",
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForMultipleChoice",
    "AutoModelForQuestionAnswering",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "Cache",
    "CheckpointError",
    "ConfigError",
    "DynamicCache",
    "PreTrainedModel",
    "PretrainedConfig",
    "attend",
    "register_attention",
]
