"""The generated packages installed, by model_type and by the GGUF architecture their specs declare."""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from types import ModuleType

from torch import nn

from .config import ConfigError


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


def package_for(model_type: str) -> ModuleType:
    packages = generated_packages()
    if model_type not in packages:
        raise ConfigError(
            f"unknown model_type `{model_type}`; known: {', '.join(sorted(packages))}. No code from a "
            "checkpoint is ever run (trust_remote_code changes nothing): give it a spec instead, a model.sf "
            "beside its config.json (see docs/language.md)"
        )
    return packages[model_type]


# Other class-name suffixes transformers uses for a task (GPT-2's causal LM is `GPT2LMHeadModel`).
_OTHER_NAMES = {"ForCausalLM": ("LMHeadModel",)}


def model_class(model_type: str, task: str = "ForCausalLM") -> type[nn.Module]:
    """The generated class for `model_type` whose name ends in `task` (`Model`, `ForCausalLM`, ...)."""
    package = package_for(model_type)
    prefix = next(n[: -len("Config")] for n in package.__all__ if n.endswith("Config"))
    names = [f"{prefix}{suffix}" for suffix in (task, *_OTHER_NAMES.get(task, ()))]
    name = next((n for n in names if n in package.__all__), names[0])
    if name not in package.__all__:
        heads = sorted(
            n[len(prefix) :]
            for n in package.__all__
            if n.startswith(prefix) and n[len(prefix) :] not in ("Config", "PreTrainedModel")
        )
        raise ConfigError(f"`{model_type}` has no {task} class; it has: {', '.join(heads)}")
    return getattr(package, name)


def gguf_architectures() -> dict[str, list[type[nn.Module]]]:
    """GGUF architecture -> the causal LMs whose specs declare it (`gguf "llama"`), the one whose
    model_type is that name first: several specs may be stored as one llama.cpp architecture (Mixtral's
    files are `llama` files with expert tensors), and the file's tensors decide between them."""
    found: dict[str, list[type[nn.Module]]] = {}
    for model_type, package in sorted(generated_packages().items()):
        classes = (getattr(package, name) for name in package.__all__)
        arch = next((c.gguf_architecture for c in classes if hasattr(c, "gguf_architecture")), None)
        if arch is not None:
            found.setdefault(arch, []).append(model_class(model_type))
    for arch, candidates in found.items():
        candidates.sort(key=lambda c: c.config_class.model_type != arch)
    return found
