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
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from specformer.dsl.errors import did_you_mean

from . import checkpoint_layout
from .checkpoint import (
    CheckpointError,
    checkpoint_files,
    count_tensors,
    existing_weight_files,
    iter_tensors,
    stage_state_dict,
)
from .config import CONFIG_NAME, ConfigError
from .errors import ArgumentError
from .files import FolderSave
from .generation.config import GENERATION_CONFIG_NAME
from .gguf import GGUFFile, read_gguf
from .hub import resolve
from .huge_pages import place_in_huge_pages
from .meta import build_on_meta
from .moe import Experts
from .placement import DeviceMap, attach_device_hooks, device_for, resolve_device_map
from .quantization import (
    QUANTIZED_LINEARS,
    PackedEmbedding,
    PackedExperts,
    WeightOnlyConfig,
    prepare_quantized,
    prepare_weight_only,
    quantize,
    quantized_layers,
)

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
    subfolder: str = "",
    config: Any = None,
    dtype: str | torch.dtype | None = "auto",
    torch_dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    use_flash_attention_2: bool = False,
    device_map: DeviceMap | None = None,
    max_memory: dict[str | int, int | str] | None = None,
    low_cpu_mem_usage: bool = True,
    strict: bool = True,
    progress: bool | None = None,
    quantization_config: Any = None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    gguf_file: str | None = None,
    trust_remote_code: bool | None = None,
    kernels: str = "torch",
    tp_plan: str | None = None,
    device_mesh: Any = None,
    huge_pages: bool | None = None,
    **config_overrides: Any,
) -> M:
    """Load a checkpoint folder or hub id (config.json + single or sharded safetensors, or legacy .bin).

    The keywords are transformers': `dtype` ("auto" keeps the dtype the config names; `torch_dtype` is its
    older name), `config` (a config object or folder used instead of the checkpoint's), `subfolder`,
    `gguf_file` (a GGUF file in the folder, dequantised), `device_map` ("cpu", "cuda", "auto", or {module
    prefix: device}; "meta" leaves a module unloaded), `max_memory`, `attn_implementation` (or the older
    `use_flash_attention_2=True`), `quantization_config` (`WeightOnlyConfig` or `BitsAndBytesConfig`;
    `load_in_8bit`/`load_in_4bit` are bitsandbytes' shorthands), and config fields to override
    (`num_labels=3`); any other keyword is an error naming the nearest one. `low_cpu_mem_usage` is always
    on: the model is built on the meta device and the checkpoint's memory-mapped tensors are assigned in
    place, with no random initialisation and no second copy. `trust_remote_code` changes nothing: no code
    from a checkpoint ever runs (an architecture comes from a spec).
    `kernels="triton"` selects fused Triton kernels for the elementwise hot spots (`set_kernels`).
    `tp_plan="auto"` (under torchrun) splits the layers the spec marks `parallel` over `device_mesh`
    (default: every rank), each rank reading only its slice of those weights.
    `huge_pages`: the weights on the CPU are copied into huge pages (`huge_pages.py`: decoding streams
    them up to 1.5x faster); None does so for models of 16 MB or more whose copy fits in the free memory.
    """
    del low_cpu_mem_usage, trust_remote_code  # always so; never needed
    _check_config_overrides(cls, config_overrides)
    if torch_dtype is not None:
        if dtype not in (None, "auto") and _dtype(dtype) != _dtype(torch_dtype):
            raise ArgumentError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass only `dtype`")
        dtype = torch_dtype
    if use_flash_attention_2:
        attn_implementation = attn_implementation or "flash_attention_2"
    quantization_config = _bnb_shorthand(quantization_config, load_in_8bit, load_in_4bit)
    directory = resolve(
        path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
    )
    directory = directory / subfolder if subfolder else directory
    if gguf_file is not None:
        if config_overrides or quantization_config is not None or config is not None:
            raise ArgumentError(
                "with gguf_file, the file's metadata is the config and its blocks the weights"
            )
        gguf_dtype = None if dtype == "auto" else dtype
        return cls.from_gguf(  # dequantised, as transformers loads GGUF files
            directory / gguf_file,
            dtype=gguf_dtype,
            attn_implementation=attn_implementation,
            device_map=device_map,
            dequantize=True,
            huge_pages=huge_pages,
        )
    config = _config_for(cls, directory, config, config_overrides)
    target_dtype = _dtype(config.dtype) if dtype == "auto" and config.dtype else None
    if dtype not in (None, "auto"):
        target_dtype = _dtype(dtype)  # type: ignore[arg-type]
    model = build_on_meta(cls, config, directory)
    if (directory / GENERATION_CONFIG_NAME).is_file() and model.can_generate():
        from .generation.config import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    files = checkpoint_files(directory)
    tensors = _with_progress(iter_tensors(files), files, progress)
    if tp_plan is not None:
        if tp_plan != "auto" or device_map is not None or quantization_config is not None:
            raise ValueError('tp_plan: expected "auto", without device_map or quantization_config')
        from .tensor_parallel import default_mesh, parallelize, shard_tensors

        mesh = device_mesh if device_mesh is not None else default_mesh()
        parallelize(model, mesh)
        # split weights assigned now, older layouts (experts stored one by one) read first
        tensors = list(shard_tensors(model, checkpoint_layout.normalize(model, tensors), target_dtype))
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
    place_in_huge_pages(model, huge_pages)
    return model._choose_attention(attn_implementation).set_kernels(kernels).eval()


def _check_config_overrides(cls: type[nn.Module], overrides: dict[str, Any]) -> None:
    """Keywords left over must be config fields (or names every config has, such as `num_labels`)."""
    config_class = cls.config_class  # type: ignore[attr-defined]
    known = {*config_class.field_types, *config_class.attribute_map, *_CONFIG_KEYWORDS}
    for name in overrides:
        if name not in known:
            hint = did_you_mean(name, [*known, *_LOAD_KEYWORDS])
            raise ArgumentError(
                f"from_pretrained() got an unexpected keyword argument `{name}`: neither a loading option nor "
                f"a field of {config_class.__name__}{hint}"
            )


# Config attributes every model has besides its spec's fields, settable at load time.
_CONFIG_KEYWORDS = ("num_labels", "id2label", "label2id", "problem_type", "output_hidden_states", "use_cache")
_LOAD_KEYWORDS = (
    "revision", "cache_dir", "local_files_only", "token", "subfolder", "config", "dtype", "torch_dtype",
    "attn_implementation", "use_flash_attention_2", "device_map", "max_memory", "low_cpu_mem_usage",
    "quantization_config", "load_in_8bit", "load_in_4bit", "gguf_file", "trust_remote_code", "kernels",
    "tp_plan", "device_mesh", "strict", "progress", "huge_pages",
)  # fmt: skip


def _bnb_shorthand(quantization_config: Any, load_in_8bit: bool, load_in_4bit: bool) -> Any:
    """`load_in_8bit=True` / `load_in_4bit=True`: bitsandbytes, as transformers maps them."""
    if not (load_in_8bit or load_in_4bit):
        return quantization_config
    if quantization_config is not None or (load_in_8bit and load_in_4bit):
        raise ArgumentError("pass one of quantization_config, load_in_8bit and load_in_4bit")
    from .quantization import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)


def _config_for(cls: type[nn.Module], directory: Path, config: Any, overrides: dict[str, Any]) -> Any:
    """The checkpoint's config, or the one given (an object, or a folder or file holding one)."""
    config_class = cls.config_class  # type: ignore[attr-defined]
    if config is None:
        return config_class.from_pretrained(directory, **overrides)
    if isinstance(config, str | os.PathLike):
        return config_class.from_pretrained(Path(config), **overrides)
    if not isinstance(config, config_class):
        raise ArgumentError(
            f"config is a {type(config).__name__}; expected a {config_class.__name__} or a path"
        )
    config = config_class.from_dict(config.to_dict())  # a copy: the caller's object is left as it was
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def from_gguf(
    cls: type[M],
    source: str | os.PathLike | GGUFFile,
    *,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    device_map: DeviceMap | None = None,
    dequantize: bool | None = None,
    activations: str = "int8",
    huge_pages: bool | None = None,
) -> M:
    """Load a llama.cpp GGUF file, or one already read.

    Linear weights stored as Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K or Q6_K stay packed by default, as int8/int4 layers
    (weight-only quantization, `quantization/weight_only.py`) with no float round trip, and so does a
    tied output projection; the C++ kernels decode from them directly, with llama.cpp's arithmetic by
    default (`activations="int8"`: activations rounded to int8 per block of 32, integer dot products) or
    with each weight widened to float (`activations="float"`: the dequantised model's numbers up to the
    order of the sums). Other tensors are dequantised to `dtype` (float32 by default). `dequantize=True`,
    or a `dtype`, asks for floats throughout. `huge_pages` as `from_pretrained`'s.
    """
    if dequantize is None:
        dequantize = dtype is not None
    checkpoint = (
        source if isinstance(source, GGUFFile) else read_gguf(source, not dequantize, model_class=cls)
    )
    config = cls.config_class.from_dict(checkpoint.config)
    model = build_on_meta(cls, config, checkpoint.source)
    target = _dtype(dtype) if dtype is not None else None
    layers = quantized_layers(checkpoint.tensors)
    if layers:
        bits = {layout.bits for layout in layers.values()}
        _packed_expert_stacks(model, checkpoint.tensors)
        prepare_weight_only(model, WeightOnlyConfig(bits=min(bits), activations=activations), layers)
        _embed_from_packed_head(model, checkpoint.tensors)
    plan = resolve_device_map(model, device_map)
    model.load_tensors(checkpoint.tensors.items(), checkpoint.source, dtype=target, placement=plan)
    place_in_huge_pages(model, huge_pages)
    return model._choose_attention(attn_implementation).eval()


def _packed_expert_stacks(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Expert stacks the checkpoint holds as each expert's packed layers (`read_gguf`) become
    `PackedExperts`, whose placeholders the quantized layers then replace."""
    for path, module in list(model.named_modules()):
        if isinstance(module, Experts) and f"{path}.gate.0.scales" in tensors:
            owner, _, name = path.rpartition(".")
            setattr(model.get_submodule(owner), name, PackedExperts.like(module))


def _embed_from_packed_head(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """A token embedding tied to a packed output projection whose float table the checkpoint left out
    (`read_gguf`) looks its rows up in the projection's blocks."""
    for tied, source in model.tied_weights().items():
        head = model.get_submodule(tied.rpartition(".")[0])
        if source in tensors or not isinstance(head, QUANTIZED_LINEARS):
            continue
        owner, _, name = source.rpartition(".")[0].rpartition(".")
        table = model.get_submodule(source.rpartition(".")[0])
        packed = PackedEmbedding(table=head, dtype=table.weight.dtype, padding_idx=table.padding_idx,
                                 scale=getattr(table, "scale", None))  # fmt: skip
        setattr(model.get_submodule(owner), name, packed)


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
    for key, tensor in checkpoint_layout.normalize(model, tensors):
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
    if strict and (missing or unexpected) and _another_head(model, missing + unexpected, has_backbone):
        # the backbone of a checkpoint saved with another head (a causal LM fine-tuned into a classifier)
        warnings.warn(
            f"{type(model).__name__}: the checkpoint was saved as {model.config.architectures[0]}; its backbone "
            f"is loaded and the new head's weights {missing[:6]} are freshly initialised: train them before "
            "use",
            UserWarning,
            stacklevel=3,
        )
        strict = False
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


def _another_head(model: nn.Module, keys: list[str], has_backbone: bool) -> bool:
    """Whether the keys that do not fit are all head keys, from a checkpoint saved with another head."""
    saved = getattr(model.config, "architectures", None) or [type(model).__name__]
    prefix = model.base_model_prefix + "."  # type: ignore[attr-defined]
    return has_backbone and saved[0] != type(model).__name__ and not any(k.startswith(prefix) for k in keys)


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
        if model.can_generate():  # the special tokens, and any decoding defaults the model carries
            generation = model.generation_defaults() | model.generation_config.to_dict()
            save.write_text(GENERATION_CONFIG_NAME, json.dumps(generation, indent=2, sort_keys=True) + "\n")
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
