"""The config base class: Hugging Face `config.json` compatible, with typed fields declared by each spec.

A generated config subclass assigns its declared fields in `__init__` and hands every other key to this
base, which keeps it so that unknown keys survive a load/save round trip.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError
from .files import atomic_write_text, read_json_object

CONFIG_NAME = "config.json"

# Keys every config understands, whatever its architecture.
_BASE_DEFAULTS: dict[str, Any] = {"architectures": None, "problem_type": None}


# Bounds checked before any module is built, so a hostile config.json fails at once instead of taking
# the machine's time and memory (`num_hidden_layers: 10000000`). Raise them for models that need it.
MAX_REPEATS = int(os.environ.get("SPECFORMER_MAX_LAYERS", "4096"))
MAX_LABELS = 1_000_000


class PretrainedConfig:
    model_type: ClassVar[str] = ""
    # HF `attribute_map`: alias -> real field (DistilBERT's `hidden_size` reads `dim`).
    attribute_map: ClassVar[dict[str, str]] = {}
    # Declared field -> expected type name, filled in by generated subclasses and checked on construction.
    field_types: ClassVar[dict[str, str]] = {}
    # Fields that count a spec's repeated blocks (`repeat(num_hidden_layers, ...)`), bounded on construction.
    repeat_counts: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **kwargs: Any) -> None:
        kwargs = dict(kwargs)
        kwargs.pop("model_type", None)
        kwargs.pop("transformers_version", None)
        for key in [k for k in kwargs if k in self.attribute_map]:
            setattr(self, self.attribute_map[key], kwargs.pop(key))
        dtype = kwargs.pop("dtype", None)
        legacy_dtype = kwargs.pop("torch_dtype", None)
        self.dtype: str | None = _dtype_name(dtype if dtype is not None else legacy_dtype)
        self.architectures: list[str] | None = kwargs.pop("architectures", None)
        self.problem_type: str | None = kwargs.pop("problem_type", None)
        id2label = kwargs.pop("id2label", None)
        num_labels = kwargs.pop("num_labels", None)
        if isinstance(num_labels, int) and not 0 <= num_labels <= MAX_LABELS:
            raise ConfigError(
                f"{type(self).__name__}: `num_labels` is {num_labels:,}; expected 0 to {MAX_LABELS:,}"
            )
        kwargs.pop("label2id", None)
        if id2label is not None:
            if not isinstance(id2label, dict) or not all(str(k).lstrip("-").isdigit() for k in id2label):
                raise ConfigError(f"{type(self).__name__}: `id2label` must map label ids to names")
            self.id2label = {int(k): v for k, v in id2label.items()}
        else:
            self.id2label = {i: f"LABEL_{i}" for i in range(2 if num_labels is None else num_labels)}
        if num_labels is not None and num_labels != len(self.id2label):
            self.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        # A request for the model built from this config (`model.attn_implementation` is what runs); not
        # serialised.
        self.attn_implementation: str | None = kwargs.pop("attn_implementation", None)
        self.extra: dict[str, Any] = kwargs  # unknown keys, written back unchanged
        self._check_types()

    # ---- attribute aliases -----------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: resolve aliases and unknown-but-present keys.
        amap = type(self).attribute_map
        if name in amap:
            return getattr(self, amap[name])
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no attribute `{name}`")

    def __setattr__(self, name: str, value: Any) -> None:
        name = type(self).attribute_map.get(name, name)
        type_name = self.field_types.get(name)
        if type_name is not None and not _matches(value, type_name):
            raise ConfigError(
                f"{type(self).__name__}: `{name}` is {value!r} ({type(value).__name__}); expected {type_name}"
            )
        super().__setattr__(name, value)

    # ---- labels ----------------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        self.id2label = {i: f"LABEL_{i}" for i in range(value)}

    @property
    def label2id(self) -> dict[str, int]:
        return {v: k for k, v in self.id2label.items()}

    # ---- validation ------------------------------------------------------------------------------
    def _check_types(self) -> None:
        for name, type_name in self.field_types.items():
            value = getattr(self, name)
            if not _matches(value, type_name):
                raise ConfigError(
                    f"{type(self).__name__}: `{name}` is {value!r} ({type(value).__name__}); expected {type_name}"
                )
        for name in self.repeat_counts:
            count = getattr(self, name)
            if isinstance(count, int) and not 0 <= count <= MAX_REPEATS:
                raise ConfigError(
                    f"{type(self).__name__}: `{name}` is {count:,}, the number of a repeated block; expected 0 to "
                    f"{MAX_REPEATS:,} (set SPECFORMER_MAX_LAYERS to allow more)"
                )

    # ---- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: copy.deepcopy(getattr(self, name)) for name in self.field_types}
        out.update(copy.deepcopy(self.extra))
        out["model_type"] = self.model_type
        if self.architectures is not None:
            out["architectures"] = list(self.architectures)
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.problem_type is not None:
            out["problem_type"] = self.problem_type
        if self.id2label != {0: "LABEL_0", 1: "LABEL_1"}:
            out["id2label"] = {str(k): v for k, v in self.id2label.items()}
            out["label2id"] = self.label2id
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> PretrainedConfig:
        model_type = data.get("model_type")
        if model_type not in (None, cls.model_type):
            raise ConfigError(
                f"config.json has model_type `{model_type}`; {cls.__name__} expects `{cls.model_type}`"
            )
        try:
            return cls(**{**data, **overrides})
        except ConfigError:
            raise
        except (ArithmeticError, TypeError, ValueError, KeyError, IndexError) as err:
            # a derived default computed from bad values (`hidden_size // num_attention_heads` with 0 heads)
            raise ConfigError(
                f"{cls.__name__}: these values do not make a config ({type(err).__name__}: {err})"
            ) from err

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> PretrainedConfig:
        try:
            return cls.from_dict(read_json_object(Path(path), ConfigError))
        except ConfigError as err:
            message = str(err)
            raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from err

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> PretrainedConfig:
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        config = cls.from_json_file(file)
        for key, value in overrides.items():
            setattr(config, key, value)
        config._check_types()
        return config

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / CONFIG_NAME
        atomic_write_text(target, self.to_json_string())
        return target

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


def _dtype_name(value: object) -> str | None:
    if value is None:
        return None
    name = str(value)
    return name.removeprefix("torch.")


_TYPE_CHECKS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "activation": lambda v: isinstance(v, str),
    "rope": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list | tuple),
    "dict": lambda v: isinstance(v, dict),
    "any": lambda v: True,
}


def _matches(value: object, type_name: str) -> bool:
    if type_name.endswith("?"):
        if value is None:
            return True
        type_name = type_name[:-1]
    if type_name.startswith("enum:"):
        return value in type_name[5:].split("|")
    return _TYPE_CHECKS[type_name](value)


def _standardize_per_kind(
    rope_parameters: Any,
    legacy: dict[str, Any],
    max_position_embeddings: int,
    kinds: dict[str, dict[str, Any]],
    legacy_keys: dict[str, dict[str, str]],
) -> dict[str, Any]:
    """Rope parameters per layer kind ({"full_attention": {...}, "sliding_attention": {...}}), each
    standardised, missing kinds from the spec's defaults. Flat legacy keys (`rope_theta`, `rope_scaling`
    at the top level of older configs) describe the first kind the spec lists; a kind's own older key
    (`legacy_keys[kind]`, e.g. `rope_local_base_freq`) its own."""
    given = rope_parameters if rope_parameters is not None else {}
    if not isinstance(given, dict) or not all(isinstance(v, dict | None) for v in given.values()):
        raise ConfigError(
            f"rope_parameters is {given!r}; expected rope parameters per layer kind {sorted(kinds)}"
        )
    unknown = set(given) - set(kinds)
    if unknown:
        raise ConfigError(f"rope_parameters has kinds {sorted(unknown)}; this model's are {sorted(kinds)}")
    first = next(iter(kinds))
    out: dict[str, Any] = {}
    for kind, default in kinds.items():
        params = dict(given.get(kind) or {})
        for old_key, parameter in legacy_keys.get(kind, {}).items():
            if old_key in legacy:
                value = legacy.pop(old_key)  # consumed either way, so it is not written back
                if not given.get(kind):
                    params.setdefault(parameter, value)
        if kind == first and not given.get(kind):
            params.update(legacy.pop("rope_scaling", None) or {})
            if "rope_theta" in legacy:
                params.setdefault("rope_theta", legacy.pop("rope_theta"))
        out[kind] = standardize_rope(
            params,
            {},
            theta=default.get("rope_theta", 10000.0),
            max_position_embeddings=max_position_embeddings,
            partial=default.get("partial_rotary_factor"),
        )
    return out


# ---- rotary position parameters ------------------------------------------------------------------
_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


def standardize_rope(
    rope_parameters: dict[str, Any] | None,
    legacy: dict[str, Any],
    theta: float | None,
    max_position_embeddings: int,
    partial: float | None = None,
    original_max_position_embeddings: int | None = None,
    kinds: dict[str, dict[str, Any]] | None = None,
    legacy_keys: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One `rope_parameters` dict from either config.json form.

    Transformers 5 writes `rope_parameters` (with `rope_theta` inside); 4.x checkpoints, most of those
    published, carry `rope_theta` and an optional `rope_scaling` at the top level. The legacy keys are
    popped from `legacy` (the constructor's leftover kwargs) so they are not written back twice.
    """
    if kinds is not None:  # legacy_keys: {kind: {older key: parameter}}
        return _standardize_per_kind(
            rope_parameters, legacy, max_position_embeddings, kinds, legacy_keys or {}
        )
    for old_key, parameter in (legacy_keys or {}).items():  # a family's older spelling, e.g. rotary_pct
        if isinstance(parameter, str) and old_key in legacy:
            legacy.setdefault(parameter, legacy.pop(old_key))
    legacy_theta = legacy.pop("rope_theta", None)
    scaling = legacy.pop("rope_scaling", None)
    params = rope_parameters or scaling or {}
    if not isinstance(params, dict):
        raise ConfigError(f"rope_parameters is {type(params).__name__}; expected an object of rope settings")
    params = dict(params)
    if "type" in params:  # very old checkpoints: {"type": "linear", "factor": 2.0}
        params.setdefault("rope_type", params.pop("type"))
    params.setdefault("rope_type", "default")
    if params["rope_type"] == "su":  # longrope's first name, in early long-context checkpoints
        params["rope_type"] = "longrope"
    params.setdefault("rope_theta", legacy_theta if legacy_theta is not None else theta)
    if "partial_rotary_factor" in legacy:
        params.setdefault("partial_rotary_factor", legacy.pop("partial_rotary_factor"))
    if partial is not None:  # the spec's default fraction of each head that rotates
        params.setdefault("partial_rotary_factor", partial)
    if params["rope_type"] not in _ROPE_TYPES:
        raise ConfigError(
            f"rope_parameters.rope_type is `{params['rope_type']}`; expected one of {_ROPE_TYPES}"
        )
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        if original_max_position_embeddings is not None:
            # a config field of its own (as transformers does, it takes precedence over the rope dict's)
            params["original_max_position_embeddings"] = original_max_position_embeddings
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    required = {
        "linear": ("factor",),
        "dynamic": ("factor",),
        "yarn": ("factor",),
        "longrope": ("long_factor", "short_factor"),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    }.get(params["rope_type"], ())
    for key in required:
        if key not in params:
            raise ConfigError(f"rope_parameters of type `{params['rope_type']}` needs `{key}`")
    for key in ("rope_theta", "factor", "partial_rotary_factor", "original_max_position_embeddings"):
        value = params.get(key)
        if value is not None and not (
            isinstance(value, int | float) and not isinstance(value, bool) and value > 0
        ):
            raise ConfigError(f"rope_parameters.{key} is {value!r}; expected a positive number")
    return params
