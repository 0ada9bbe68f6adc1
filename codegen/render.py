"""Rendering: a planned package -> file contents. The templates are file skeletons (header, docstring,
imports, classes); `codegen.emit` writes the classes and works out their imports. Deterministic to the
byte for a given spec."""

from __future__ import annotations

from functools import cache

import jinja2

from specformer.dsl import ir

from .code import Line
from .emit import module_source, statements_source
from .plan import plan


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


def render_model(model: ir.ResolvedModel) -> dict[str, str]:
    """{relative path under generated/: contents} for one model."""
    package = plan(model)
    env = _environment()
    config_source, config_imports = module_source([package.config])
    modeling_source, modeling_imports = module_source(package.classes)
    common = {
        "sources": ", ".join(_printable(f) for f in model.source_files),
        "spec_hash": model.spec_hash,
        "package": package.package,
        "config_name": package.config.name,
        "exports": package.exports,
        "model_doc": package.doc,
    }
    registrations, registration_imports = statements_source([Line(c) for c in package.registrations])
    files = {
        "__init__.py": env.get_template("__init__.py.jinja").render(
            common, imports=registration_imports, registrations=registrations
        ),
        f"configuration_{package.package}.py": env.get_template("module.py.jinja").render(
            common,
            doc=f'"""Configuration of {model.name} models; fields and defaults as in its spec."""',
            imports=config_imports,
            local_import=None,
            source=config_source,
        ),
        f"modeling_{package.package}.py": env.get_template("module.py.jinja").render(
            common,
            doc=package.doc,
            imports=modeling_imports,
            local_import=f"from .configuration_{package.package} import {package.config.name}",
            source=modeling_source,
        ),
    }
    return {f"{package.package}/{path}": text.rstrip("\n") + "\n" for path, text in files.items()}


def _printable(name: str) -> str:
    """A file name as the header comment can carry it: a newline in it must not start a line of code."""
    return "".join(c if c.isprintable() else "?" for c in name)
