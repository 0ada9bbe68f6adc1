"""Architectures that travel as specs: build a model package from spec text at run time, safely.

Hugging Face needs `trust_remote_code=True` — running a stranger's Python — to load an architecture it
does not ship. A spec is data: it is parsed and validated (no loops beyond `repeat`, no imports, no
attribute access beyond declared primitives, names checked, repeat counts and file size bounded), the
module source is generated from it by our own templates, and that source is checked again, node by node,
against the small subset of Python the generator emits before it is executed. Nothing from the spec's
author runs. The model's size is computed on the meta device before anything is allocated.

A model built this way keeps its spec texts; `save_pretrained` writes them beside config.json
(`model.sf`, plus the specs it extends), so `from_pretrained` of that folder, or of a hub repo made from
it, rebuilds the same architecture.
"""

from __future__ import annotations

import ast
import builtins
import importlib.resources
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import UnsafeSourceError
from .meta import build_on_meta

SPEC_FILE = "model.sf"

# The Python the generator emits, and nothing else.
_NODES = frozenset(
    [
        "Module",
        "ClassDef",
        "FunctionDef",
        "arguments",
        "arg",
        "Return",
        "Assign",
        "AnnAssign",
        "If",
        "For",
        "Expr",
        "Call",
        "Attribute",
        "Name",
        "Constant",
        "BinOp",
        "UnaryOp",
        "BoolOp",
        "Compare",
        "IfExp",
        "Subscript",
        "Slice",
        "Tuple",
        "List",
        "Set",
        "Dict",
        "ListComp",
        "GeneratorExp",
        "comprehension",
        "keyword",
        "Import",
        "ImportFrom",
        "alias",
        "Load",
        "Store",
        "Add",
        "Sub",
        "Mult",
        "Div",
        "FloorDiv",
        "Mod",
        "Pow",
        "BitOr",
        "And",
        "Or",
        "Not",
        "USub",
        "UAdd",
        "Eq",
        "NotEq",
        "Lt",
        "LtE",
        "Gt",
        "GtE",
        "Is",
        "IsNot",
        "In",
        "NotIn",
        "Pass",
    ]
)
_BUILTINS = frozenset(
    [
        "range",
        "tuple",
        "str",
        "list",
        "super",
        "int",
        "float",
        "bool",
        "dict",
        "frozenset",
        "property",
        "isinstance",
        "len",
        "min",
        "max",
    ]
)
_IMPORTS = ("__future__", "typing", "torch", "torch.nn", "torch.nn.functional", "specformer.runtime.")
# Everything generated code reaches through torch, nn and F: no loading, no process, no extension APIs.
_TORCH_NAMES = frozenset(
    [
        "torch.Tensor", "torch.tanh", "torch.sigmoid", "torch.zeros_like",
        "nn.Module", "nn.ModuleList", "nn.LayerNorm", "nn.Dropout",
        "F.silu", "F.gelu", "F.relu", "F.dropout",
    ]
)  # fmt: skip


def _dotted(node: ast.Attribute) -> str | None:
    """`torch.nn.functional.x` for an attribute chain on a plain name; None for anything else."""
    parts = [node.attr]
    value = node.value
    while isinstance(value, ast.Attribute):
        parts.append(value.attr)
        value = value.value
    return ".".join([value.id, *reversed(parts)]) if isinstance(value, ast.Name) else None


def check_generated_source(source: str, filename: str) -> ast.Module:
    """Parse `source` and refuse any construct, name or import outside what the generator emits."""
    tree = ast.parse(source, filename)
    banned_builtins = set(dir(builtins)) - _BUILTINS - {"None", "True", "False"}

    def refuse(node: ast.AST, what: str) -> UnsafeSourceError:
        return UnsafeSourceError(f"{filename}:{getattr(node, 'lineno', 0)}: {what}; refusing to execute it")

    for node in ast.walk(tree):
        kind = type(node).__name__
        if kind not in _NODES:
            raise refuse(node, f"`{kind}` is not something generated code contains")
        if isinstance(node, ast.Name):
            if node.id in banned_builtins or (node.id.startswith("__") and node.id != "__all__"):
                raise refuse(node, f"name `{node.id}`")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and node.attr != "__init__":
            raise refuse(node, f"attribute `{node.attr}`")
        elif (
            isinstance(node, ast.Attribute)
            and (dotted := _dotted(node))
            and dotted.split(".")[0] in ("torch", "nn", "F")
        ):
            if dotted not in _TORCH_NAMES and not any(n.startswith(dotted + ".") for n in _TORCH_NAMES):
                raise refuse(node, f"`{dotted}` is not something a generated model calls")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name not in _IMPORTS:
                    raise refuse(node, f"import of `{alias.name}`")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            relative_ok = node.level == 1 and module.replace("_", "").isalnum()
            absolute_ok = node.level == 0 and (module in _IMPORTS or module.startswith(_IMPORTS[-1]))
            if not (relative_ok or absolute_ok):
                raise refuse(node, f"import from `{'.' * node.level}{module}`")
    return tree


def installed_specs() -> dict[str, str]:
    """The spec files shipped with specformer: {file name: text}."""
    root = importlib.resources.files("specformer.specs")
    return {p.name: p.read_text(encoding="utf-8") for p in root.iterdir() if p.name.endswith(".sf")}


_PACKAGES: dict[str, ModuleType] = {}  # spec hash -> package built from it (each spec is built once)


def build_package(
    sources: dict[str, str], model_type: str | None = None, name: str | None = None
) -> ModuleType:
    """Validate the specs, generate the package in memory, check it and import it.

    `sources` maps file names to texts; installed specs fill in whatever they `extend` and the sources
    lack. The model is the one named `name`, else the one whose `model_type` is `model_type`, else the
    only model declared in `sources`.
    """
    from specformer.codegen import render_model
    from specformer.dsl import SpecError, SpecSet

    specs = SpecSet()
    declared: list[str] = []
    for file, text in sorted(sources.items()):
        declared += specs.add_text(text, file)
    for file, text in sorted(installed_specs().items()):
        probe = SpecSet()
        names = probe.add_text(text, file)
        clashes = [n for n in names if n in specs.models]
        for clash in clashes:  # the folder's copy of an installed spec is fine; another version is not
            mine = specs.models[clash].source_file
            if sources[mine] != text:
                raise SpecError(
                    f"{mine}: declares model `{clash}`, which the installed spec {file} declares differently; "
                    "a checkpoint's spec cannot replace an installed one: give its model another name",
                    specs.models[clash].pos,
                )
        if not clashes:
            specs.add_text(text, file)
    if name is None:
        if model_type is not None:
            matches = [n for n in declared if specs.models[n].type_name == model_type]
        else:
            matches = declared
        if len(matches) != 1:
            wanted = f"model_type `{model_type}`" if model_type else "one model"
            raise SpecError(
                f"{', '.join(sorted(sources))}: expected {wanted} among {declared}, found {len(matches)}"
            )
        name = matches[0]
    resolved = specs.resolved(name)
    if resolved.spec_hash in _PACKAGES:
        return _PACKAGES[resolved.spec_hash]
    files = render_model(resolved)
    package_dir = next(iter(files)).split("/")[0]
    package_name = f"specformer_spec_{package_dir}_{resolved.spec_hash[:12]}"
    trees = {rel: check_generated_source(text, f"<{name} from spec>/{rel}") for rel, text in files.items()}
    package = ModuleType(package_name)
    package.__path__ = []  # a package, so the generated relative imports resolve
    package.__package__ = package_name
    sys.modules[package_name] = package
    order = sorted(files, key=lambda rel: (rel.endswith("__init__.py"), "modeling_" in rel))
    for rel in order:
        stem = Path(rel).stem
        full = package_name if stem == "__init__" else f"{package_name}.{stem}"
        module = package if stem == "__init__" else ModuleType(full)
        module.__package__ = package_name
        sys.modules[full] = module
        exec(compile(trees[rel], f"<{name} from spec>/{rel}", "exec"), module.__dict__)  # checked above
    used = {f: specs.sources[f] for f in resolved.source_files}
    base = getattr(package, next(n for n in package.__all__ if n.endswith("PreTrainedModel")))
    base.spec_sources = used  # written next to config.json by save_pretrained
    base.spec_main_file = resolved.pos.file  # the file declaring the model itself
    _PACKAGES[resolved.spec_hash] = package
    return package


def spec_sources_in(directory: Path) -> dict[str, str] | None:
    """The specs a checkpoint folder carries, or None when it carries none."""
    if not (directory / SPEC_FILE).is_file():
        return None
    from specformer.dsl.loader import read_spec

    return {p.name: read_spec(p) for p in sorted(directory.glob("*.sf"))}


def spec_files(model_class: type) -> dict[str, str]:
    """The files a spec-built model's checkpoint carries (file name -> text): the main spec as model.sf,
    the specs it extends under their own names. Empty for a model not built from a spec."""
    sources: dict[str, str] = getattr(model_class, "spec_sources", None) or {}
    main = getattr(model_class, "spec_main_file", None)
    return {SPEC_FILE if file == main else Path(file).name: text for file, text in sources.items()}


def check_size(model_class: type, config: Any, source: object = "the spec's config") -> int:
    """Count the parameters `model_class(config)` would have, on the meta device; a config that cannot
    build it, or builds one over MAX_PARAMETERS, is a ConfigError before anything is allocated."""
    return build_on_meta(model_class, config, source).num_parameters()


def model_class_from(package: ModuleType, task: str) -> type:
    prefix = next(n[: -len("Config")] for n in package.__all__ if n.endswith("Config"))
    if f"{prefix}{task}" not in package.__all__:
        heads = sorted(
            n[len(prefix) :] for n in package.__all__ if n.startswith(prefix) and "Config" not in n
        )
        raise ValueError(f"the spec's model has no {task} class; it has: {', '.join(heads)}")
    return getattr(package, f"{prefix}{task}")
