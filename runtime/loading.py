"""Loading and saving models in Hugging Face's layout: config.json beside safetensors (single or
sharded) or legacy weights, the hub, GGUF files. `PreTrainedModel` binds these as its `from_pretrained`,
`from_gguf`, `load_tensors` and `save_pretrained`.

Models are built on the meta device and the checkpoint's memory-mapped tensors assigned in place: no
random initialisation is computed and thrown away, and no second copy is made. Every key and shape is
checked, and a mismatch names the keys.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from .checkpoint import (
    CheckpointError,
    checkpoint_files,
    count_tensors,
    existing_weight_files,
    iter_tensors,
    stage_state_dict,
)
from .config import CONFIG_NAME, ConfigError
from .files import FolderSave
from .generation.config import GENERATION_CONFIG_NAME
from .gguf import GGUFFile, read_gguf
from .hub import resolve
from .meta import build_on_meta
from .placement import DeviceMap, attach_device_hooks, device_for, resolve_device_map
from .quantization import WeightOnlyConfig, prepare_quantized, prepare_weight_only, quantize, quantized_layers

M = TypeVar("M", bound=nn.Module)
logger = logging.getLogger("specformer.runtime.modeling")


def _dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"dtype `{value}` is not a torch dtype (e.g. float32, bfloat16, float16)")
    return dtype


def from_pretrained(
    cls: type[M],
    path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    dtype: str | torch.dtype | None = "auto",
    attn_implementation: str | None = None,
    device_map: DeviceMap | None = None,
    max_memory: dict[str | int, int | str] | None = None,
    strict: bool = True,
    progress: bool | None = None,
    quantization_config: Any = None,
    kernels: str = "torch",
    tp_plan: str | None = None,
    device_mesh: Any = None,
    **config_overrides: Any,
) -> M:
    """Load a checkpoint folder or hub id (config.json + single or sharded safetensors, or legacy .bin).

    The model is built on the meta device and the checkpoint's memory-mapped tensors are assigned in
    place: no random initialisation is computed and thrown away, and no second copy is made.
    `dtype="auto"` keeps the dtype the config names; `device_map` places modules ("cpu", "cuda",
    "auto", or {module prefix: device}; "meta" leaves a module unloaded).
    `quantization_config` (`WeightOnlyConfig` or `BitsAndBytesConfig`) quantizes the backbone's linear
    layers as they load; a checkpoint saved quantized (its config.json says how) reloads as it was.
    `kernels="triton"` selects fused Triton kernels for the elementwise hot spots (`set_kernels`).
    `tp_plan="auto"` (under torchrun) splits the layers the spec marks `parallel` over `device_mesh`
    (default: every rank), each rank reading only its slice of those weights.
    """
    directory = resolve(
        path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
    )
    config = cls.config_class.from_pretrained(directory, **config_overrides)
    target_dtype = _dtype(config.dtype) if dtype == "auto" and config.dtype else None
    if dtype not in (None, "auto"):
        target_dtype = _dtype(dtype)  # type: ignore[arg-type]
    model = build_on_meta(cls, config, directory)
    files = checkpoint_files(directory)
    tensors = _with_progress(iter_tensors(files), files, progress)
    if tp_plan is not None:
        if tp_plan != "auto" or device_map is not None or quantization_config is not None:
            raise ValueError('tp_plan: expected "auto", without device_map or quantization_config')
        from .tensor_parallel import default_mesh, parallelize, shard_tensors

        mesh = device_mesh if device_mesh is not None else default_mesh()
        parallelize(model, mesh)
        tensors = list(shard_tensors(model, tensors, target_dtype))  # split weights assigned now
        device_map = (
            "cpu" if mesh.device_type == "cpu" else f"{mesh.device_type}:{torch.cuda.current_device()}"
        )
    plan = resolve_device_map(model, device_map, max_memory)
    saved = getattr(config, "quantization_config", None)
    if saved is not None:  # stored quantized: give the model matching layers before assigning
        by_name = dict(tensors)  # memory-mapped, so this holds no copies
        prepare_quantized(model, saved, by_name)
        tensors = iter(by_name.items())
    model.load_tensors(tensors, str(directory), dtype=target_dtype, placement=plan, strict=strict)
    if quantization_config is not None and saved is None:
        quantize(model, quantization_config)
    return model._choose_attention(attn_implementation).set_kernels(kernels).eval()


def from_gguf(
    cls: type[M],
    source: str | os.PathLike | GGUFFile,
    *,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    device_map: DeviceMap | None = None,
    dequantize: bool = True,
) -> M:
    """Load a llama.cpp GGUF file, or one already read, dequantised to `dtype` (float32 by default).

    `dequantize=False` keeps Q8_0/Q4_0/Q4_1 linear weights as int8/int4 layers (weight-only
    quantization, see `quantization.py`) with no float round trip; other tensors are dequantised.
    """
    checkpoint = (
        source if isinstance(source, GGUFFile) else read_gguf(source, not dequantize, model_class=cls)
    )
    config = cls.config_class.from_dict(checkpoint.config)
    model = build_on_meta(cls, config, checkpoint.source)
    target = _dtype(dtype) if dtype is not None else None
    layers = quantized_layers(checkpoint.tensors)
    if layers:
        bits = {b for b, _ in layers.values()}
        prepare_weight_only(model, WeightOnlyConfig(bits=min(bits)), layers)
    plan = resolve_device_map(model, device_map)
    model.load_tensors(checkpoint.tensors.items(), checkpoint.source, dtype=target, placement=plan)
    return model._choose_attention(attn_implementation).eval()


def load_tensors(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    source: str,
    *,
    dtype: torch.dtype | None = None,
    placement: dict[str, torch.device] | None = None,
    strict: bool = True,
) -> None:
    """Assign checkpoint tensors to this (meta-built) model, checking every key and shape. Tensors
    already materialised (layers a quantizer built from the checkpoint) are not expected again."""
    plan = placement or {"": torch.device("cpu")}
    expected = {k: v for k, v in model.state_dict().items() if v.device.type == "meta"}
    tied = set(model.active_ties())
    prefix = model.base_model_prefix + "."
    has_backbone = hasattr(model, model.base_model_prefix) and isinstance(
        getattr(model, model.base_model_prefix), nn.Module
    )
    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    head_only: list[str] = []  # a head checkpoint's own weights, when loading just its backbone
    from_head_checkpoint = False
    mismatched: list[str] = []
    for key, tensor in tensors:
        name = key
        if name not in expected:
            # A backbone checkpoint loaded into a head model, or a head checkpoint into a backbone.
            if has_backbone and prefix + name in expected:
                name = prefix + name
            elif not has_backbone and name.startswith(prefix) and name[len(prefix) :] in expected:
                name = name[len(prefix) :]
                from_head_checkpoint = True
            elif _ignorable(name):
                continue
            elif not has_backbone and not name.startswith(prefix):
                head_only.append(key)
                continue
            else:
                unexpected.append(key)
                continue
        if tuple(tensor.shape) != tuple(expected[name].shape):
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[name].shape)}")
            continue
        device = device_for(name, plan)
        if device.type == "meta":
            loaded[name] = expected[name]  # left unloaded, as asked
            continue
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        loaded[name] = tensor.to(device)
    if from_head_checkpoint:
        logger.info("%s: ignoring the checkpoint's head weights %s", type(model).__name__, head_only[:5])
    else:
        unexpected += head_only
    missing = [k for k in expected if k not in loaded and k not in tied]
    if not strict:
        if unexpected:
            logger.warning("%s: ignoring unexpected keys %s", type(model).__name__, unexpected[:12])
        if missing:
            logger.warning(
                "%s: initialising keys the checkpoint lacks: %s", type(model).__name__, missing[:12]
            )
            _materialize(model, missing, dtype, plan)
        missing, unexpected = [], []
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {source} does not fit {type(model).__name__}:"]
        for title, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
                lines.append(f"  {title} keys: {shown}")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(loaded, strict=False, assign=True)
    model.tie_weights()  # assignment replaced the shared parameters; share them again
    for name, buffer in list(model.named_buffers()):  # rotary tables and such follow their module
        owner, _, attr = name.rpartition(".")
        device = device_for(name, plan)
        if device.type != "meta" and buffer.device != device:
            model.get_submodule(owner).register_buffer(attr, buffer.to(device), persistent=False)
    attach_device_hooks(model, plan)


@staticmethod
def _ignorable(key: str) -> bool:
    # Non-persistent buffers older exporters wrote (rotary frequencies, causal-mask tables); only keys the
    # model does not have reach here, so a real parameter of that name is never dropped.
    return key.endswith(
        (".rotary_emb.inv_freq", "embeddings.position_ids", ".masked_bias", ".attn.bias", ".attention.bias")
    )


def _materialize(
    model: nn.Module, keys: list[str], dtype: torch.dtype | None, plan: dict[str, torch.device]
) -> None:
    """Give freshly initialised storage to parameters the checkpoint did not have (non-strict loads)."""
    for key in keys:
        owner_name, _, _ = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner.to_empty(device=device_for(key, plan), recurse=False)
        if dtype is not None:
            owner.to(dtype)
        model._init_module(owner)


def save_pretrained(model: nn.Module, path: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> Path:
    """Write config.json, safetensors weights (sharded past `max_shard_size`), generation_config.json and,
    for a spec-built model, its specs; all switched in together over whatever checkpoint was there."""
    from .spec_models import SPEC_FILE, spec_files

    directory = Path(path)
    tied = set(model.active_ties())
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    model.config.architectures = [type(model).__name__]
    model.config.dtype = str(model.dtype).removeprefix("torch.")
    specs = spec_files(type(model))
    with FolderSave(directory) as save:
        stage_state_dict(save, state, max_shard_size)
        save.write_text(CONFIG_NAME, model.config.to_json_string())
        for name, text in specs.items():
            save.write_text(name, text)
        generation = model.generation_defaults()
        if generation:
            save.write_text(GENERATION_CONFIG_NAME, json.dumps(generation, indent=2) + "\n")
        # an old spec would rebuild the old architecture around the new weights
        stale = existing_weight_files(directory) | ({SPEC_FILE} if SPEC_FILE not in specs else set())
        save.commit(remove=stale)
    return directory


def _with_progress(
    tensors: Iterable[tuple[str, torch.Tensor]], files: list[Path], progress: bool | None
) -> Iterable[tuple[str, torch.Tensor]]:
    """A tqdm bar over the tensors for big checkpoints (over 200 MB) or when asked."""
    size = sum(f.stat().st_size for f in files)
    if progress is False or (progress is None and size < 200 * 2**20):
        return tensors
    from tqdm.auto import tqdm

    return tqdm(tensors, total=count_tensors(files), desc="Loading weights", unit="tensor", leave=False)
