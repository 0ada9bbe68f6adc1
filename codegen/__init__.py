"""The code generator: validated spec IR -> readable PyTorch packages under `generated/`."""

from .render import render_model

__all__ = ["render_model"]
