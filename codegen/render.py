"""Rendering: planned views -> file contents. Deterministic to the byte for a given spec."""

from __future__ import annotations

from functools import cache

import jinja2

from specformer.dsl import ir

from .layout import INDENT, statement_lines
from .plan import ModelView, plan


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("specformer.codegen", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def _layout(view: ModelView) -> ModelView:
    for cls in view.classes:
        cls.init_lines = [out for line in cls.init_lines for out in statement_lines(INDENT * 2, line)]
    return view


def render_model(model: ir.ResolvedModel) -> dict[str, str]:
    """{relative path under generated/: contents} for one model."""
    view = _layout(plan(model))
    env = _environment()
    context = {
        "sources": ", ".join(model.source_files),
        "spec_hash": model.spec_hash,
        "package": view.package,
        "config": view.config,
        "classes": view.classes,
        "imports": view.imports,
        "exports": view.exports,
        "typing_names": _typing_names(view.classes),
        "model_doc": view.doc,
    }
    files = {
        f"{view.package}/__init__.py": env.get_template("__init__.py.jinja").render(context),
        f"{view.package}/configuration_{view.package}.py": env.get_template("configuration.py.jinja").render(
            context
        ),
        f"{view.package}/modeling_{view.package}.py": env.get_template("modeling.py.jinja").render(context),
    }
    return {path: text.rstrip("\n") + "\n" for path, text in files.items()}


def _typing_names(classes: list) -> list[str]:
    """The `typing` names the generated module needs: `Any` in method signatures, `ClassVar` for tables."""
    names = []
    if any("ClassVar[" in a for c in classes for a in c.attributes):
        names.append("ClassVar")
    if any("Any" in line for c in classes for m in c.methods for line in m):
        names.insert(0, "Any")
    return names
