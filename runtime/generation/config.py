"""GenerationConfig: Hugging Face's decoding settings, validated, and `generation_config.json` on disk."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from specformer.dsl.errors import did_you_mean

from ..errors import ArgumentError, GenerationError
from ..files import atomic_write_text, read_json_object

_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

GENERATION_CONFIG_NAME = "generation_config.json"


@dataclass
class GenerationConfig:
    # length
    max_length: int = 20
    max_new_tokens: int | None = None
    min_length: int = 0
    min_new_tokens: int | None = None
    early_stopping: bool | str = False
    max_time: float | None = None
    stop_strings: str | list[str] | None = None
    # strategy
    do_sample: bool = False
    num_beams: int = 1
    use_cache: bool = True
    cache_implementation: str | None = None  # dynamic, static, sliding_window, sink, quantized, offloaded
    # window, sink, nbits, residual_length; dtype: the dynamic/static cache's storage ("float16": half a
    # float32 model's cache, as llama.cpp keeps its own)
    cache_config: dict[str, Any] | None = None
    # logits processing
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: list[list[int]] | None = None
    sequence_bias: Any = None  # {(token ids...): bias}, or [[ids, bias], ...] as JSON keeps it
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    length_penalty: float = 1.0
    num_return_sequences: int = 1
    # special tokens
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # outputs
    return_dict_in_generate: bool = False
    output_scores: bool = False
    output_logits: bool = False
    # keys we do not interpret, kept so a round trip loses nothing
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} - {"extra"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        known = cls.fields()
        return cls(
            **{k: v for k, v in data.items() if k in known},
            extra={k: v for k, v in data.items() if k not in known},
        )

    @classmethod
    def from_model_config(cls, config: Any) -> GenerationConfig:
        keys = ("bos_token_id", "eos_token_id", "pad_token_id")
        return cls(**{k: getattr(config, k) for k in keys if getattr(config, k, None) is not None})

    def update(self, **overrides: Any) -> GenerationConfig:
        """A copy with `overrides` applied; unknown names are an error naming them."""
        unknown = sorted(set(overrides) - self.fields())
        if unknown:
            hint = did_you_mean(unknown[0], self.fields())
            raise ArgumentError(f"unknown generation argument(s): {', '.join(unknown)}{hint}")
        return dataclasses.replace(self, **overrides)

    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def cache_dtype(self) -> torch.dtype | None:
        """The dtype `cache_config["dtype"]` asks the cache to store keys and values in (None: the model's)."""
        value = (self.cache_config or {}).get("dtype")
        if value is None or isinstance(value, torch.dtype):
            return value
        dtype = _CACHE_DTYPES.get(str(value).removeprefix("torch."))
        if dtype is None:
            raise GenerationError(
                f"cache_config dtype {value!r}: expected one of {', '.join(sorted(_CACHE_DTYPES))}"
            )
        return dtype

    def validate(self) -> None:
        """Contradictions are errors; settings that will be ignored are warnings, as in Hugging Face."""
        self.cache_dtype()
        if self.num_beams < 1:
            raise GenerationError(f"num_beams is {self.num_beams}; expected at least 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens is {self.max_new_tokens}; expected a count >= 0")
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise GenerationError(
                f"num_return_sequences ({self.num_return_sequences}) has to be smaller or equal to num_beams "
                f"({self.num_beams}) without sampling"
            )
        if self.temperature <= 0 and self.do_sample:
            raise GenerationError(f"temperature is {self.temperature}; sampling needs a temperature > 0")
        if not 0.0 <= self.top_p <= 1.0 or not 0.0 < self.typical_p <= 1.0:
            raise GenerationError("top_p must lie in [0, 1] and typical_p in (0, 1]")
        if self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty is {self.repetition_penalty}; expected a value > 0")
        if self.early_stopping not in (True, False, "never"):
            raise GenerationError(
                f"early_stopping is {self.early_stopping!r}; expected True, False or 'never'"
            )
        if not self.do_sample:
            ignored = [
                name
                for name, value, default in (
                    ("temperature", self.temperature, 1.0),
                    ("top_p", self.top_p, 1.0),
                    ("min_p", self.min_p, None),
                    ("typical_p", self.typical_p, 1.0),
                )
                if value != default
            ]
            if self.top_k not in (None, 50):
                ignored.append("top_k")
            if ignored:
                warnings.warn(
                    f"`do_sample` is False, so {', '.join(ignored)} will be ignored; set do_sample=True to sample",
                    UserWarning,
                    stacklevel=3,
                )

    def to_dict(self) -> dict[str, Any]:
        defaults = GenerationConfig()
        data = {
            k: getattr(self, k) for k in sorted(self.fields()) if getattr(self, k) != getattr(defaults, k)
        }
        return {**data, **self.extra}

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        target = Path(directory) / GENERATION_CONFIG_NAME
        atomic_write_text(target, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return target

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> GenerationConfig:
        path = Path(directory)
        file = path / GENERATION_CONFIG_NAME if path.is_dir() else path
        return cls.from_dict(read_json_object(file))
