"""The configuration class of a model: constructor parameters, derived defaults, `let` properties."""

from __future__ import annotations

from dataclasses import dataclass

from specformer.dsl import ir
from specformer.dsl.errors import SpecError
from specformer.dsl.ir import names_in
from specformer.dsl.library import FIELD_TYPES

from .expressions import ExprEmitter
from .layout import INDENT, statement_lines


@dataclass
class ConfigView:
    name: str
    model_type: str
    doc: str
    attribute_map: list[tuple[str, str]]
    params: list[str]
    body: list[str]
    field_types: list[tuple[str, str]]
    properties: list[list[str]]
    uses_rope: bool


def is_literal(field: ir.ConfigField) -> bool:
    """A default that reads no other field: a constant, or an activation/enum spelled as a bare name."""
    if isinstance(field.default, ir.Name):
        return field.type.name in ("activation", "enum")
    return field.default is not None and not list(names_in(field.default))


def _no_call(node: ir.Call) -> str:
    raise SpecError("calls are not allowed in a config expression", node.pos)


def python_type(field: ir.ConfigField) -> str:
    return FIELD_TYPES[field.type.name].python


def literal_source(field: ir.ConfigField) -> str:
    """The Python spelling of a literal default."""
    assert field.default is not None
    if isinstance(field.default, ir.Name):  # activation or enum spelled as a bare name
        return f'"{field.default.id}"'
    return ExprEmitter(lambda n: n, _no_call)(field.default)


def plan_config(
    model: ir.ResolvedModel, order: list[str], layer_lets: frozenset[str], name_of: ExprEmitter, doc: str
) -> ConfigView:
    """`order` lists fields with every field after those its default reads; `name_of` spells config
    names inside the class (`self.x`, or a `let`'s value)."""
    fields = {f.name: f for f in model.config.fields}
    params: list[str] = []
    plain: list[str] = []
    derived: list[str] = []
    properties: list[list[str]] = []
    field_types: list[tuple[str, str]] = []
    body: list[str] = []
    for alias in model.config.aliases:
        body += [f'if "{alias.alias}" in kwargs:', f'{INDENT}{alias.target} = kwargs.pop("{alias.alias}")']
    for f in model.config.fields:  # constructor parameters in the order the spec declares them
        if f.computed:
            continue
        py = python_type(f)
        type_name = f"enum:{'|'.join(f.type.choices)}" if f.type.name == "enum" else f.type.name
        field_types.append((f.name, type_name + ("?" if f.type.optional else "")))
        optional = " | None" if f.type.optional and py != "Any" else ""
        if f.default is None:
            params.append(f"{f.name}: {py}{optional}")
            plain.append(f"self.{f.name} = {f.name}")
        elif f.type.name == "rope" or not is_literal(f):
            params.append(
                f"{f.name}: {'dict' if f.type.name == 'rope' else py}{'' if py == 'Any' else ' | None'} = None"
            )
        else:
            params.append(f"{f.name}: {py}{optional} = {literal_source(f)}")
            plain.append(f"self.{f.name} = {f.name}")
    for name in order:  # derived defaults, each after the fields it reads
        f = fields[name]
        if f.computed or f.default is None or (f.type.name != "rope" and is_literal(f)):
            continue
        if f.type.name == "rope":
            theta = f.default.kwarg("theta") if isinstance(f.default, ir.Call) else None
            theta_src = ExprEmitter(lambda n: n, _no_call)(theta) if theta is not None else "10000.0"
            max_pos = "self.max_position_embeddings" if "max_position_embeddings" in fields else "None"
            derived.append(
                f"self.{f.name} = standardize_rope({f.name}, kwargs, theta={theta_src}, max_position_embeddings={max_pos})"
            )
        else:
            derived.append(f"self.{f.name} = {name_of(f.default)} if {f.name} is None else {f.name}")
    for f in model.config.fields:
        if f.computed and f.name not in layer_lets:
            py = python_type(f)
            annotation = f"{py} | None" if f.type.optional and py != "Any" else py
            value = literal_source(f) if is_literal(f) else name_of(f.default)  # type: ignore[arg-type]
            properties.append(
                [
                    f"{INDENT}@property",
                    f"{INDENT}def {f.name}(self) -> {annotation}:",
                    *statement_lines(INDENT * 2, f"return {value}"),
                ]
            )
    body += plain + derived
    return ConfigView(
        name=f"{model.name}Config",
        model_type=model.model_type,
        doc=doc,
        attribute_map=[(a.alias, a.target) for a in model.config.aliases],
        params=params,
        body=[line for b in body for line in statement_lines(INDENT * 2, b)],
        field_types=field_types,
        properties=properties,
        uses_rope=any(f.type.name == "rope" for f in model.config.fields),
    )
