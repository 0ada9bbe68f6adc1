"""Tensor parallelism from the spec's `parallel` lines, with torch.distributed DTensor over a DeviceMesh.

A generated model carries `base_model_tp_plan` (backbone module patterns such as
`layers.*.self_attn.q_proj` -> "colwise") and heads their own `tp_plan` (`lm_head` -> "gather"). Colwise
layers keep a slice of output rows (whole attention heads), rowwise layers a slice of input columns and
all-reduce their output, so activations between them stay local: the Megatron layout. Loading under
`torchrun` reads only each rank's slice of every split weight from the memory-mapped checkpoint.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("specformer")

STYLES = ("colwise", "rowwise", "gather", "replicate", "experts")


def full_tp_plan(model: nn.Module) -> dict[str, str]:
    """The model's plan with paths from its root: the backbone's (prefixed when a head holds it) and the
    head's own."""
    base = dict(getattr(type(model), "base_model_tp_plan", {}))
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if isinstance(backbone, nn.Module):
        base = {f"{prefix}.{pattern}": style for pattern, style in base.items()}
    return base | dict(getattr(type(model), "tp_plan", {}))


def planned_modules(model: nn.Module, plan: dict[str, str]) -> dict[str, str]:
    """Module name -> style for every module a plan pattern matches (`*` stands for one layer index)."""
    patterns = [(re.compile(re.escape(p).replace(r"\*", r"\d+") + "$"), s) for p, s in plan.items()]
    found = {}
    for name, _ in model.named_modules():
        for pattern, style in patterns:
            if pattern.match(name):
                found[name] = style
    return found


def check_divisible(config: Any, world_size: int) -> None:
    """Heads and kv-heads must split evenly over the ranks: a rank holds whole heads."""
    for field in ("num_attention_heads", "num_key_value_heads"):
        count = getattr(config, field, None)
        if isinstance(count, int) and count % world_size:
            raise ValueError(
                f"tensor parallelism over {world_size} ranks: config.{field} = {count} is not divisible by "
                f"{world_size}; use a world size that divides it"
            )


def parallelize(model: nn.Module, mesh: Any) -> dict[str, str]:
    """Apply the model's plan over a 1-D `mesh` (before or after its weights exist); returns what was split.

    Layers tied to another module (an lm_head sharing the embedding table) stay replicated.
    """
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    check_divisible(model.config, mesh.size())
    styles = {
        "colwise": ColwiseParallel,
        "rowwise": RowwiseParallel,
        "gather": lambda: ColwiseParallel(output_layouts=Replicate()),
    }
    tied_owners = {key.rpartition(".")[0] for key in getattr(model, "active_ties", dict)()}
    chosen = {}
    for name, style in planned_modules(model, full_tp_plan(model)).items():
        if style == "replicate":
            continue
        if style == "experts":  # expert parallelism: whole experts per rank, outputs summed
            _keep_experts(model.get_submodule(name), name, mesh)
            chosen[name] = style
            continue
        if name in tied_owners:
            logger.info("tensor parallel: %s shares its weight with another module; kept replicated", name)
            continue
        chosen[name] = style
    split = {name: styles[style]() for name, style in chosen.items() if style in styles}
    parallelize_module(model, mesh, split)
    return chosen


def _keep_experts(module: nn.Module, name: str, mesh: Any) -> None:
    world, rank = mesh.size(), mesh.get_local_rank()
    if module.num_experts % world:
        raise ValueError(
            f"expert parallelism over {world} ranks: `{name}` has {module.num_experts} experts, not divisible "
            f"by {world}; use a world size that divides it"
        )
    count = module.num_experts // world
    module.keep_experts(rank * count, count, mesh.get_group())


def default_mesh() -> Any:
    """A 1-D mesh over every rank of the running process group (torchrun), on its device type."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            'tp_plan="auto" needs a torch.distributed process group: launch with `torchrun --nproc-per-node N` '
            "(or call torch.distributed.init_process_group first)"
        )
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),))


def shard_tensors(
    model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Assign this rank's slice of every split weight as it streams by; pass the other tensors on.

    Checkpoint tensors are memory-mapped, so slicing before copying reads only this rank's part.
    """
    from torch.distributed.tensor import DTensor, Shard

    sharded = {name: p for name, p in model.named_parameters() if isinstance(p, DTensor)}
    experts = {  # expert-parallel stacks: this rank's experts are a slice of the first dimension
        f"{path}.{part}": module
        for path, module in model.named_modules()
        if getattr(module, "group", None) is not None and hasattr(module, "first_expert")
        for part in ("gate_up_proj", "down_proj")
    }
    for key, tensor in tensors:
        stack = experts.get(key)
        if stack is not None:
            local = tensor.narrow(0, stack.first_expert, stack.local_experts).to(dtype=dtype or tensor.dtype)
            setattr(stack, key.rpartition(".")[2], nn.Parameter(local.contiguous()))
            continue
        param = sharded.get(key)
        if param is None:
            yield key, tensor
            continue
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(
                f"checkpoint `{key}` has shape {tuple(tensor.shape)}; the model expects {tuple(param.shape)}"
            )
        local = tensor
        mesh = param.device_mesh
        for placement in param.placements:
            if isinstance(placement, Shard):
                size = tensor.shape[placement.dim] // mesh.size()
                local = local.narrow(placement.dim, mesh.get_local_rank() * size, size)
        device = torch.device(mesh.device_type) if mesh.device_type != "cpu" else torch.device("cpu")
        local = local.to(device=device, dtype=dtype or tensor.dtype).contiguous()
        owner, _, attr = key.rpartition(".")
        module = model.get_submodule(owner)
        value = DTensor.from_local(local, mesh, param.placements, run_check=False)
        setattr(module, attr, nn.Parameter(value, requires_grad=param.requires_grad))
