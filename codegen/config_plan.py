"""The configuration class of a model, as data: constructor parameters, derived defaults, `let` properties."""

from __future__ import annotations

import json

from specformer.dsl import ir
from specformer.dsl.errors import SpecError
from specformer.dsl.ir import names_in
from specformer.dsl.library import FIELD_TYPES, ROPE_LEGACY_KEYS

from .code import Attribute, Class, Function, Line, Nested, Param, Stmt
from .expressions import ExprEmitter


def is_literal(field: ir.ConfigField) -> bool:
    """A default that reads no other field: a constant, or an activation/enum spelled as a bare name."""
    if isinstance(field.default, ir.Name):
        return field.type.name in ("activation", "enum")
    return field.default is not None and not list(names_in(field.default))


def shared_default(field: ir.ConfigField) -> bool:
    """A literal default Python would share between calls (a list): the parameter defaults to None and
    the constructor builds a fresh one."""
    return isinstance(field.default, ir.ListExpr)


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
    model: ir.ResolvedModel,
    order: list[str],
    layer_lets: frozenset[str],
    name_of: ExprEmitter,
    read: set[str],
) -> Class:
    """`order` lists fields with every field after those its default reads; `name_of` spells config
    names inside the class (`self.x`, or a `let`'s value) and adds each `let` it reads as an attribute to
    `read`, which already holds those the model's code reads: only they become properties."""
    fields = {f.name: f for f in model.config.fields}
    params: list[Param] = []
    plain: list[str] = []
    derived: list[str] = []
    properties: list[Function] = []
    field_types: list[tuple[str, str]] = []
    body: list[Stmt] = []
    for alias in model.config.aliases:
        body.append(
            Nested(f'if "{alias.alias}" in kwargs:', (Line(f'{alias.target} = kwargs.pop("{alias.alias}")'),))
        )
    for f in model.config.fields:  # constructor parameters in the order the spec declares them
        if f.computed:
            continue
        py = python_type(f)
        type_name = f"enum:{'|'.join(f.type.choices)}" if f.type.name == "enum" else f.type.name
        field_types.append((f.name, type_name + ("?" if f.type.optional else "")))
        optional = " | None" if f.type.optional and py != "Any" else ""
        if f.default is None:
            params.append(Param(f.name, f"{py}{optional}"))
            plain.append(f"self.{f.name} = {f.name}")
        elif f.type.name == "rope" or not is_literal(f) or shared_default(f):
            annotation = f"{'dict' if f.type.name == 'rope' else py}{'' if py == 'Any' else ' | None'}"
            params.append(Param(f.name, annotation, "None"))
        else:
            params.append(Param(f.name, f"{py}{optional}", literal_source(f)))
            plain.append(f"self.{f.name} = {f.name}")
    for name in order:  # derived defaults, each after the fields it reads
        f = fields[name]
        if (
            f.computed
            or f.default is None
            or (f.type.name != "rope" and is_literal(f) and not shared_default(f))
        ):
            continue
        if f.type.name == "rope" and _per_kind(f.default):
            kinds = json.dumps(model.facts.defaults[f.name])  # {kind: parameters}: str and number leaves
            max_pos = "self.max_position_embeddings" if "max_position_embeddings" in fields else "None"
            legacy = {kind: _legacy_keys(call) for kind, call in f.default.kwargs}
            legacy_src = f", legacy_keys={json.dumps(legacy)}" if any(legacy.values()) else ""
            derived.append(
                f"self.{f.name} = standardize_rope({f.name}, kwargs, theta=None, "
                f"max_position_embeddings={max_pos}, kinds={kinds}{legacy_src})"
            )
        elif f.type.name == "rope":
            theta = f.default.kwarg("theta") if isinstance(f.default, ir.Call) else None
            partial = f.default.kwarg("partial") if isinstance(f.default, ir.Call) else None
            theta_src = ExprEmitter(lambda n: n, _no_call)(theta) if theta is not None else "10000.0"
            partial_src = (
                f", partial={ExprEmitter(lambda n: n, _no_call)(partial)}" if partial is not None else ""
            )
            max_pos = "self.max_position_embeddings" if "max_position_embeddings" in fields else "None"
            original = "original_max_position_embeddings"
            original_src = f", {original}=self.{original}" if original in fields else ""
            legacy_keys = _legacy_keys(f.default)
            original_src += f", legacy_keys={json.dumps(legacy_keys)}" if legacy_keys else ""
            derived.append(
                f"self.{f.name} = standardize_rope({f.name}, kwargs, theta={theta_src}{partial_src}, "
                f"max_position_embeddings={max_pos}{original_src})"
            )
        else:
            derived.append(f"self.{f.name} = {name_of(f.default)} if {f.name} is None else {f.name}")
    bodies: dict[str, str] = {}
    while set(read) - set(bodies):  # a property's value may read another `let`
        for name in sorted(set(read) - set(bodies)):
            f = fields[name]
            bodies[name] = literal_source(f) if is_literal(f) else name_of(f.default)  # type: ignore[arg-type]
    for f in model.config.fields:
        if f.computed and f.name not in layer_lets and f.name in bodies:
            py = python_type(f)
            annotation = f"{py} | None" if f.type.optional and py != "Any" else py
            properties.append(
                Function(
                    f.name, (), annotation, (Line(f"return {bodies[f.name]}"),), decorators=("@property",)
                )
            )
    body += [Line(line) for line in [*plain, *derived, "super().__init__(**kwargs)"]]
    # fields without a default first: Python takes no required parameter after an optional one
    params.sort(key=lambda p: p.default is not None)
    init = Function("__init__", (*params, Param("**kwargs", "Any")), "None", tuple(body), expand=True)
    attributes = [Attribute("model_type", "ClassVar[str]", f'"{model.model_type}"')]
    if model.config.aliases:
        aliases = tuple((a.alias, a.target) for a in model.config.aliases)
        attributes.append(Attribute("attribute_map", "ClassVar[dict[str, str]]", entries=aliases))
    attributes.append(Attribute("field_types", "ClassVar[dict[str, str]]", entries=tuple(field_types)))
    counts = [
        s.count.id
        for b in model.blocks
        for s in b.submodules
        if s.kind == "repeat" and isinstance(s.count, ir.Name)
    ]
    counts = [name for name in dict.fromkeys(counts) if name in fields]
    if counts:  # bounded by the runtime before anything is built
        quoted = ", ".join(f'"{name}"' for name in counts)
        attributes.append(Attribute("repeat_counts", "ClassVar[tuple[str, ...]]", f"({quoted},)"))
    return Class(f"{model.name}Config", "PretrainedConfig", "", tuple(attributes), (init, *properties))


def _per_kind(default: ir.Expr) -> bool:
    """`rope(full_attention = rope(...), ...)`: tables per layer kind."""
    return isinstance(default, ir.Call) and any(isinstance(v, ir.Call) for _, v in default.kwargs)


def _legacy_keys(default: ir.Expr) -> dict[str, str]:
    """{older config key: rope parameter} from `rope(..., theta_key = "...", partial_key = "...")`."""
    if not isinstance(default, ir.Call):
        return {}
    return {
        v.value: ROPE_LEGACY_KEYS[k]
        for k, v in default.kwargs
        if k in ROPE_LEGACY_KEYS and isinstance(v, ir.String)
    }
