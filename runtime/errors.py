"""The runtime's errors: one family under `SpecformerError`, each naming the file, key or argument at fault.

Each also derives from the builtin exception code written before it would catch (`ValueError` for bad
values, `RuntimeError` for files that cannot be used), so existing `except` clauses keep working.
"""

from __future__ import annotations

from specformer.dsl.errors import SpecError, SpecformerError

__all__ = [
    "ArgumentError",
    "CheckpointError",
    "ConfigError",
    "GenerationError",
    "SpecError",
    "SpecformerError",
    "TemplateError",
    "TokenizerError",
    "UnsafeSourceError",
]


class CheckpointError(SpecformerError, RuntimeError):
    """A checkpoint that is missing, malformed, or does not fit the model."""


class ConfigError(SpecformerError, ValueError):
    """A config.json or a constructor argument with the wrong type or value."""


class TokenizerError(SpecformerError, ValueError):
    """A tokenizer file that cannot be used: names the file, the key and what was expected."""


class TemplateError(SpecformerError, ValueError):
    """A chat template that failed to render (raised by the template itself or by Jinja)."""


class GenerationError(SpecformerError, ValueError):
    """Generation arguments that cannot be honoured: names the argument and what was expected."""


class UnsafeSourceError(SpecformerError, RuntimeError):
    """Generated source contained something the generator never emits: refused before execution."""


class ArgumentError(SpecformerError, TypeError):
    """A keyword argument a function does not take: names it and the nearest one it does."""
