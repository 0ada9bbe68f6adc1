"""What every generated architecture shares: configs, checkpoints, attention, rotary tables, caches, losses."""

from .attention import ATTENTION_BACKENDS, AttentionMask, attend, register_attention
from .cache import Cache, DynamicCache
from .checkpoint import CheckpointError
from .config import ConfigError, PretrainedConfig
from .modeling import PreTrainedModel

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionMask",
    "Cache",
    "CheckpointError",
    "ConfigError",
    "DynamicCache",
    "PreTrainedModel",
    "PretrainedConfig",
    "attend",
    "register_attention",
]
