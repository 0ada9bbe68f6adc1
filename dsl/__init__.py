"""The spec language: grammar, parser, validated IR."""

from .errors import SpecError
from .ir import ResolvedModel
from .loader import SpecSet, load_dir, load_file
from .parser import parse

__all__ = ["ResolvedModel", "SpecError", "SpecSet", "load_dir", "load_file", "parse"]
