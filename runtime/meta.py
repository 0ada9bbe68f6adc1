"""Building a model without allocating or initialising its weights: factory calls land on `meta`.

`torch.device("meta")` as a context manager does much the same, but it runs the modules' initialisers on
meta tensors through torch's reference implementations, whose first use imports the compiler stack
(about a second on a small machine). This mode skips those initialisers, which compute nothing on meta.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import ConfigError

M = TypeVar("M", bound=nn.Module)

# The largest model built from an untrusted config or spec, counted on meta before anything is allocated.
MAX_PARAMETERS = int(os.environ.get("SPECFORMER_MAX_PARAMETERS", str(200 * 10**9)))

# The constructors nn.Module initialisers use. Explicit `device=` arguments are respected, so a module
# can still build real buffers (rotary tables) while its parameters stay on meta.
_CONSTRUCTORS: frozenset[Callable] = frozenset(
    {
        torch.empty,
        torch.empty_strided,
        torch.zeros,
        torch.ones,
        torch.full,
        torch.rand,
        torch.randn,
        torch.randint,
        torch.arange,
        torch.tensor,
        torch.eye,
        torch.linspace,
    }
)
# In-place initialisers (torch.nn.init's and the tensor methods they call).
_INITIALISERS = frozenset(
    {
        "normal_",
        "uniform_",
        "zero_",
        "zeros_",
        "ones_",
        "fill_",
        "constant_",
        "kaiming_uniform_",
        "trunc_normal_",
    }
)


class meta_init(TorchFunctionMode):  # lower case: used like a function, `with meta_init(): ...`
    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _CONSTRUCTORS and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        elif getattr(func, "__name__", "") in _INITIALISERS:
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if getattr(target, "is_meta", False):
                return target
        return func(*args, **kwargs)


def build_on_meta(cls: type[M], config: Any, source: object) -> M:
    """`cls(config)` on the meta device (nothing allocated). A config whose values cannot make the model
    (zero heads, sizes that do not divide) or that makes one over MAX_PARAMETERS is a ConfigError naming
    `source` (the checkpoint, spec or argument it came from), not a crash inside the model."""
    try:
        with meta_init():
            model = cls(config)
    except (ArithmeticError, ValueError, TypeError, RuntimeError, AssertionError, IndexError) as err:
        raise ConfigError(
            f"{source}: its config cannot build {cls.__name__} ({type(err).__name__}: {err}); check its values"
        ) from err
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_PARAMETERS:
        raise ConfigError(
            f"{source}: {cls.__name__} with this config has {count:,} parameters, over the limit of "
            f"{MAX_PARAMETERS:,}; check the config (or raise SPECFORMER_MAX_PARAMETERS)"
        )
    return model
