"""Merging `extends` chains: a delta model plus its ancestors becomes one flat model."""

from __future__ import annotations

from fnmatch import fnmatchcase

from . import ir
from .errors import SpecError, did_you_mean
from .library import BUILTINS, PRIMITIVES

MAX_EXTENDS_DEPTH = 16


def resolve(name: str, registry: dict[str, ir.Model]) -> tuple[ir.Model, tuple[ir.Model, ...]]:
    """The flat model named `name`, and its lineage (itself first, then each ancestor)."""
    chain: list[ir.Model] = []
    current = registry[name]
    while True:
        if any(m.name == current.name for m in chain):
            cycle = " -> ".join([m.name for m in chain] + [current.name])
            raise SpecError(f"cycle in `extends`: {cycle}", chain[-1].parent_pos)
        chain.append(current)
        if current.parent is None:
            break
        if len(chain) > MAX_EXTENDS_DEPTH:
            raise SpecError(f"`extends` chain deeper than {MAX_EXTENDS_DEPTH} models", current.parent_pos)
        if current.parent not in registry:
            hint = did_you_mean(current.parent, registry)
            raise SpecError(
                f"`{current.name}` extends unknown model `{current.parent}`{hint}", current.parent_pos
            )
        current = registry[current.parent]
    flat = chain[-1]
    for delta in reversed(chain[:-1]):
        flat = _apply(flat, delta)
    return _block_calls_as_refs(flat), tuple(chain)


def _block_calls_as_refs(model: ir.Model) -> ir.Model:
    """`bert_model = Model(add_pooling_layer = false)` parses like a primitive; it is a block with options."""
    names = {b.name for b in model.blocks}
    blocks = []
    for block in model.blocks:
        subs = tuple(
            s.model_copy(update={"kind": "block"}) if s.kind == "primitive" and s.target in names else s
            for s in block.submodules
        )
        blocks.append(block.model_copy(update={"submodules": subs}))
    return model.model_copy(update={"blocks": tuple(blocks)})


def _apply(base: ir.Model, delta: ir.Model) -> ir.Model:
    fields = {f.name: f for f in base.config.fields}  # in declaration order; updated in place
    declared = {f.name: f for f in delta.config.fields}
    for name, pos in delta.field_removals:
        # `remove x` then `x: float = ...`: the inherited field goes and the new one takes its name
        later = declared.get(name)
        if later is not None and (later.pos.line, later.pos.column) > (pos.line, pos.column):
            if name not in fields:
                raise SpecError(f"cannot remove unknown field `{name}`{did_you_mean(name, fields)}", pos)
            del fields[name]
    for field in delta.config.fields:
        fields[field.name] = field
    for name, value, pos in delta.field_overrides:
        if name not in fields:
            hint = did_you_mean(name, fields)
            raise SpecError(
                f"unknown field `{name}` in `{base.name}`{hint} (declare new fields with a type: `{name}: int = ...`)",
                pos,
            )
        fields[name] = fields[name].model_copy(update={"default": value, "pos": pos})
    for name, pos in delta.field_lets:
        if name not in fields:
            hint = did_you_mean(name, fields)
            raise SpecError(f"`let {name}`: `{base.name}` has no field `{name}`{hint}", pos)
        if fields[name].default is None:
            raise SpecError(f"`let {name}`: `{name}` has no default to compute it from", pos)
        fields[name] = fields[name].model_copy(update={"computed": True, "pos": pos})
    for name, pos in delta.field_removals:
        later = declared.get(name)
        if later is not None and (later.pos.line, later.pos.column) > (pos.line, pos.column):
            continue  # replaced above
        if name not in fields:
            raise SpecError(f"cannot remove unknown field `{name}`{did_you_mean(name, fields)}", pos)
        del fields[name]
    aliases = {a.alias: a for a in base.config.aliases} | {a.alias: a for a in delta.config.aliases}

    blocks = list(base.blocks)
    for block in delta.blocks:
        index = next((i for i, b in enumerate(blocks) if b.name == block.name), None)
        if block.role == "backbone":
            index = next(i for i, b in enumerate(blocks) if b.role == "backbone")
        if index is None:
            blocks.append(block)
        else:
            if blocks[index].role != block.role:
                raise SpecError(
                    f"`{block.name}` is a {blocks[index].role} in `{base.name}` and cannot become a {block.role}",
                    block.pos,
                )
            blocks[index] = block

    def find(block_name: str, pos: ir.Pos) -> int:
        index = next((i for i, b in enumerate(blocks) if b.name == block_name), None)
        if index is None:
            hint = did_you_mean(block_name, [b.name for b in blocks])
            raise SpecError(f"`{base.name}` has no block `{block_name}`{hint}", pos)
        return index

    for block_name, sub in delta.module_overrides:
        index = find(block_name, sub.pos)
        subs = list(blocks[index].submodules)
        at = next((i for i, s in enumerate(subs) if s.name == sub.name), None)
        if at is None:
            subs.append(sub)
        else:
            subs[at] = sub
        blocks[index] = blocks[index].model_copy(update={"submodules": tuple(subs)})
    for block_name, forward in delta.forward_overrides:
        index = find(block_name, forward.pos)
        blocks[index] = blocks[index].model_copy(update={"forward": forward})
    for override in delta.argument_overrides:
        index = find(override.block, override.pos)
        blocks[index] = _override_argument(blocks[index], override)
    for block_name, sub_name, pos in delta.module_removals:
        index = find(block_name, pos)
        subs = blocks[index].submodules
        if not any(s.name == sub_name for s in subs):
            hint = did_you_mean(sub_name, [s.name for s in subs])
            raise SpecError(f"`{block_name}` has no submodule `{sub_name}`{hint}", pos)
        parallel = tuple(
            p.model_copy(update={"names": tuple(n for n in p.names if n != sub_name)})
            for p in blocks[index].parallel
        )
        blocks[index] = blocks[index].model_copy(
            update={
                "submodules": tuple(s for s in subs if s.name != sub_name),
                "parallel": tuple(p for p in parallel if p.names),
            }
        )
    for head_name, pos in delta.head_removals:
        index = find(head_name, pos)
        if blocks[index].role != "head":
            raise SpecError(f"`{head_name}` is not a head", pos)
        del blocks[index]
    for head_name, attr, pos in delta.head_moves:
        index = find(head_name, pos)
        if blocks[index].role != "head":
            raise SpecError(f"`{head_name}` is not a head", pos)
        blocks[index] = blocks[index].model_copy(update={"attr": attr})

    return delta.model_copy(
        update={
            "parent": None,
            "model_type": delta.model_type,  # its own, like its name: a delta is another architecture
            "gguf": delta.gguf,
            "stored_names": (*base.stored_names, *delta.stored_names),
            "config": ir.ConfigSchema(fields=tuple(fields.values()), aliases=tuple(aliases.values())),
            "field_overrides": (),
            "field_removals": (),
            "field_lets": (),
            "blocks": tuple(blocks),
            "module_overrides": (),
            "forward_overrides": (),
            "argument_overrides": (),
            "head_removals": (),
            "head_moves": (),
            "module_removals": (),
        }
    )


def _override_argument(block: ir.Block, override: ir.ArgumentOverride) -> ir.Block:
    """`block` with `override.argument` set on every submodule its pattern matches or, failing that, on
    every call its forward makes to a function of that name. The changed submodule takes the override's
    position, so a comment on the override line is what the generated code carries."""
    matched = [s for s in block.submodules if fnmatchcase(s.name, override.pattern)]
    if matched:
        subs = tuple(_set_on_submodule(s, override) if s in matched else s for s in block.submodules)
        return block.model_copy(update={"submodules": subs})
    local = {s.name for s in block.submodules}
    builtin = BUILTINS.get(override.pattern)
    calls = [c for c in block.forward.calls() if c.func == override.pattern] if block.forward else []
    if builtin is None or override.pattern in local or not calls:
        candidates = [s.name for s in block.submodules] + [
            c.func for c in (block.forward.calls() if block.forward else [])
        ]
        hint = did_you_mean(override.pattern, candidates)
        raise SpecError(
            f"`{block.name}` has no submodule matching `{override.pattern}` and its forward calls no builtin of that name{hint}",
            override.pos,
        )
    names = builtin.signature.names

    def change(call: ir.Call) -> ir.Call:
        if call.func != override.pattern:
            return call
        args, kwargs = _set_argument(call.args, call.kwargs, names, override, call.func)
        return call.model_copy(update={"args": args, "kwargs": kwargs})

    assert block.forward is not None
    body = []
    for stmt in block.forward.body:
        values = tuple(ir.map_calls(v, change) for v in ir.statement_exprs(stmt))
        if values == ir.statement_exprs(stmt):
            body.append(stmt)
        elif isinstance(stmt, ir.Assign):  # at the override's position, which carries its comment
            body.append(stmt.model_copy(update={"value": values[0], "pos": override.pos}))
        else:
            body.append(stmt.model_copy(update={"values": values, "pos": override.pos}))
    return block.model_copy(update={"forward": block.forward.model_copy(update={"body": tuple(body)})})


def _set_on_submodule(sub: ir.Submodule, override: ir.ArgumentOverride) -> ir.Submodule:
    if sub.kind == "repeat" or (sub.kind == "block" and not sub.kwargs):
        raise SpecError(
            f"`{sub.name}` is a {sub.kind} of `{sub.target}` and takes no arguments", override.pos
        )
    primitive = PRIMITIVES.get(sub.target) if sub.kind == "primitive" else None
    names = primitive.signature.names if primitive is not None else ()
    args, kwargs = _set_argument(sub.args, sub.kwargs, names, override, sub.target)
    return sub.model_copy(update={"args": args, "kwargs": kwargs, "pos": override.pos})


def _set_argument(
    args: tuple[ir.Expr, ...],
    kwargs: tuple[tuple[str, ir.Expr], ...],
    names: tuple[str, ...],
    override: ir.ArgumentOverride,
    callee: str,
) -> tuple[tuple[ir.Expr, ...], tuple[tuple[str, ir.Expr], ...]]:
    """(args, kwargs) with `override.argument` given `override.value`, where it was given or by name."""
    key, value = override.argument, override.value
    if names and key not in names:
        raise SpecError(f"`{callee}` has no parameter `{key}`{did_you_mean(key, names)}", override.pos)
    if key in names[: len(args)]:
        at = names.index(key)
        return (*args[:at], value, *args[at + 1 :]), kwargs
    if any(k == key for k, _ in kwargs):
        return args, tuple((k, value if k == key else v) for k, v in kwargs)
    return args, (*kwargs, (key, value))
