"""Planned classes -> Python source: the one place that decides layout, blank lines and imports.

Imports are computed in one pass over the finished code: every name a class reads without binding it
is looked up among the names the generated code may use (`library.runtime_names()`, `typing`, torch's).
"""

from __future__ import annotations

import ast

from specformer.dsl.library import runtime_names

from .code import Attribute, Class, Function, Line, Nested, Stmt
from .layout import INDENT, import_lines, signature_lines, statement_lines, table_lines

RUNTIME_NAMES = runtime_names()
_TYPING = ("Any", "ClassVar")


# ---- classes ---------------------------------------------------------------------------------------
def class_lines(cls: Class) -> list[str]:
    lines = [f"class {cls.name}({cls.base}):"]
    members: list[list[str]] = []
    if cls.attributes:
        members.append([line for a in cls.attributes for line in attribute_lines(a)])
    members += [function_lines(f, INDENT) for f in cls.methods]
    if cls.doc:
        lines += [f"{INDENT}{cls.doc}", ""]
    for i, member in enumerate(members):
        lines += ([""] if i else []) + member
    return lines


def attribute_lines(attribute: Attribute) -> list[str]:
    head = f"{attribute.name}: {attribute.annotation}" if attribute.annotation else attribute.name
    if attribute.entries:
        return table_lines(INDENT, head, list(attribute.entries))
    return statement_lines(INDENT, f"{head} = {attribute.value}")


def function_lines(function: Function, indent: str) -> list[str]:
    lines = [f"{indent}# {text}" for text in function.comments]
    lines += [f"{indent}{d}" for d in function.decorators]
    params = ["self", *(str(p) for p in function.params)]
    lines += signature_lines(indent, function.name, params, function.returns, function.expand)
    return lines + body_lines(function.body, indent + INDENT)


def body_lines(body: tuple[Stmt, ...] | list[Stmt], indent: str) -> list[str]:
    lines: list[str] = []
    for stmt in body:
        if isinstance(stmt, Line):
            lines += statement_lines(indent, stmt.text)
        else:
            assert isinstance(stmt, Nested)
            lines.append(f"{indent}{stmt.head}")
            lines += body_lines(stmt.body, indent + INDENT)
    return lines


# ---- imports ---------------------------------------------------------------------------------------
def _free_names(source: str) -> set[str]:
    """Names the code reads that no enclosing function binds, nor the module defines."""
    tree = ast.parse(source)
    defined = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    free: set[str] = set()

    def visit(node: ast.AST, bound: frozenset[str]) -> None:
        if isinstance(node, ast.FunctionDef):
            args = node.args
            params = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
            for annotated in (*(p.annotation for p in params if p is not None), node.returns):
                if annotated is not None:
                    visit(annotated, bound)
            stored = {
                n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
            }
            inner = bound | {p.arg for p in params if p is not None} | stored
            for stmt in node.body:
                visit(stmt, inner)
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in bound:
            free.add(node.id)
        for child in ast.iter_child_nodes(node):
            visit(child, bound)

    visit(tree, frozenset())
    return free - defined


def isort_order(names: set[str]) -> list[str]:
    """isort's order inside one `from` import: CONSTANTS, then Classes, then functions."""
    return sorted(names, key=lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n))


def import_block(source: str) -> list[str]:
    """The import lines `source` needs, grouped and ordered as ruff's isort wants them."""
    used = _free_names(source)
    typing = [n for n in _TYPING if n in used]
    torch = [
        line
        for line, name in (("import torch", "torch"), ("import torch.nn.functional as F", "F"))
        if name in used
    ]
    if "nn" in used:
        torch.append("from torch import nn")
    runtime: dict[str, set[str]] = {}
    for name in used:
        if name in RUNTIME_NAMES:
            runtime.setdefault(RUNTIME_NAMES[name], set()).add(name)
    groups = [[f"from typing import {', '.join(typing)}"] if typing else [], torch]
    groups.append(
        [
            line
            for module in sorted(runtime)
            for line in import_lines(f"specformer.runtime.{module}", isort_order(runtime[module]))
        ]
    )
    lines: list[str] = []
    for group in groups:
        if group:
            lines += ([""] if lines else []) + group
    return lines


def statements_source(statements: list[Stmt]) -> tuple[list[str], list[str]]:
    """(module-level statements laid out, the imports they need)."""
    lines = body_lines(statements, "")
    return lines, import_block("\n".join(lines))


def module_source(classes: list[Class]) -> tuple[str, list[str]]:
    """(the classes' source, two blank lines apart; the imports it needs)."""
    source = "\n\n\n".join("\n".join(class_lines(c)) for c in classes)
    return source, import_block(source)
