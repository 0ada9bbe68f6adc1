"""Older checkpoint layouts, read into the model's own: submodules stored under another name, and experts
stored one by one where the model stacks them.

A spec says both: `stored DecoderLayer.mlp as "block_sparse_moe"` (the generated model lists the key
prefixes in `stored_names`), and `Experts(..., per_expert = ["w1", "w3", "w2"])` (each expert's gate, up and down
projection as separate (out, in) matrices: `experts.3.w1.weight`). Keys are renamed as they stream past;
per-expert matrices are held until a stack is complete, then stacked once. A stack left incomplete is
passed on as it was, so the loader's error names the keys that do not fit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .moe import Experts


def normalize(
    model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """`tensors` with every key in the model's own layout. Keys are matched under the backbone, with or
    without its prefix (`model.`), and keep the prefix they came with."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    renames = [(_pattern(old), new) for old, new in getattr(model, "stored_names", {}).items()]
    stacks = {}
    for path, module in model.named_modules():
        if isinstance(module, Experts):
            stacks[path.removeprefix(prefix)] = module
    if not renames and not stacks:
        yield from tensors
        return
    held: dict[str, dict[str, torch.Tensor]] = {path: {} for path in stacks}
    for key, tensor in tensors:
        lead = prefix if key.startswith(prefix) else ""
        local = _renamed(key[len(lead) :], renames)
        path = _stack_of(local, stacks)
        if path is None:
            yield lead + local, tensor
            continue
        held[path][lead + local] = tensor
        if len(held[path]) == 3 * stacks[path].num_experts:
            yield from _stacked(lead + path, stacks[path], held.pop(path)).items()
    for parts in held.values():
        yield from parts.items()


def stored_paths(model: nn.Module, path: str) -> list[str]:
    """`path` (a module of `model`) as older checkpoints name it, when a spec says so: the model's own name
    first (`model.layers.0.mlp.experts`, then `model.layers.0.block_sparse_moe.experts`)."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    lead = prefix if path.startswith(prefix) else ""
    local = path[len(lead) :] + "."
    found = [path]
    for old, new in getattr(model, "stored_names", {}).items():
        renamed = _renamed(local, [(_pattern(new), old)])
        if renamed != local:
            found.append(lead + renamed.removesuffix("."))
    return found


def _pattern(path: str) -> re.Pattern[str]:
    """`layers.*.block_sparse_moe.` as a regular expression: `*` is a layer's index."""
    return re.compile(re.escape(path).replace(r"\*", r"(\d+)"))


def _renamed(key: str, renames: list[tuple[re.Pattern[str], str]]) -> str:
    for old, new in renames:
        found = old.match(key)
        if found:
            for index in found.groups():
                new = new.replace("*", index, 1)
            return new + key[found.end() :]
    return key


def _stack_of(key: str, stacks: dict[str, Experts]) -> str | None:
    """The Experts stack a per-expert key (`<path>.<e>.<projection>.weight`) belongs to."""
    for path, module in stacks.items():
        rest = key[len(path) + 1 :] if key.startswith(f"{path}.") else None
        if rest is None:
            continue
        index, _, projection = rest.partition(".")
        names = {f"{n}.weight" for n in module.per_expert}
        if index.isdigit() and int(index) < module.num_experts and projection in names:
            return path
    return None


def _stacked(path: str, module: Experts, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    gate, up, down = module.per_expert
    each = range(module.num_experts)
    return {
        f"{path}.gate_up_proj": torch.stack(
            [torch.cat([parts[f"{path}.{e}.{gate}.weight"], parts[f"{path}.{e}.{up}.weight"]]) for e in each]
        ),
        f"{path}.down_proj": torch.stack([parts[f"{path}.{e}.{down}.weight"] for e in each]),
    }
