"""The model base class: weight initialisation, tying, and Hugging Face style load/save."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import nn

from .checkpoint import CheckpointError, checkpoint_files, count_tensors, iter_tensors, save_state_dict
from .config import PretrainedConfig
from .files import atomic_write_text
from .hub import resolve
from .layers import Embedding, RMSNorm
from .meta import meta_init
from .placement import DeviceMap, attach_device_hooks, device_for, resolve_device_map
from .quantization import prepare_quantized, quantize

if TYPE_CHECKING:
    from .gguf import GGUFFile

M = TypeVar("M", bound="PreTrainedModel")
logger = logging.getLogger(__name__)

GENERATION_CONFIG_NAME = "generation_config.json"


def _dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype `{value}` is not a torch dtype (e.g. float32, bfloat16, float16)")
    return dtype


class PreTrainedModel(nn.Module):
    config_class: ClassVar[type[PretrainedConfig]] = PretrainedConfig
    # The attribute under which heads hold the backbone; also the key prefix of its weights.
    base_model_prefix: ClassVar[str] = "model"

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} expects a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config
        # The attention backend every layer uses (`set_attention`); the backbone hands it to the layers.
        self.attn_implementation: str = config.attn_implementation or "specformer_cpu"

    # ---- construction ----------------------------------------------------------------------------
    def tied_weights(self) -> dict[str, str]:
        """Parameters that share storage: {tied key: source key}. Generated heads override this."""
        return {}

    def post_init(self) -> None:
        """Initialise weights (skipped on the meta device, where loading will assign them) and tie.

        A head's backbone runs `post_init` first; its modules are marked so the head does not
        initialise them a second time.
        """
        for module in self.modules():
            if getattr(module, "_sf_initialized", False):
                continue
            if not any(p.is_meta for p in module.parameters(recurse=False)):
                self._init_module(module)
            module._sf_initialized = True
        self.tie_weights()

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each repeated block (the spec's `repeat(...)`) in the backward pass instead of keeping
        its activations: memory for one block's activations at the cost of a second forward."""
        from functools import partial

        from torch.utils.checkpoint import checkpoint

        for block in repeated_blocks(self):
            if "forward" not in block.__dict__:  # not wrapped yet
                block.forward = partial(checkpoint, type(block).forward.__get__(block), use_reentrant=False)

    def gradient_checkpointing_disable(self) -> None:
        for block in repeated_blocks(self):
            block.__dict__.pop("forward", None)

    def set_kernels(self: M, kernels: str) -> M:
        """Compute RMSNorm, rotary embeddings and gated activations with `kernels`: "torch" (default) or
        "triton" (fused kernels with their own backward; CUDA/XPU, or any device under TRITON_INTERPRET=1)."""
        if kernels not in ("torch", "triton"):
            raise ValueError(f"kernels={kernels!r}; expected 'torch' or 'triton'")
        if kernels == "triton":
            from .hardware import is_triton_available, require

            require("triton", "kernels='triton'")
            if not is_triton_available(self.device):
                raise ValueError(
                    f"kernels='triton' needs a CUDA or XPU device (the model is on {self.device.type}); "
                    "set TRITON_INTERPRET=1 to run them, slowly, on the CPU"
                )
        for module in self.modules():
            if hasattr(module, "kernel"):
                module.kernel = kernels
        return self

    def active_ties(self) -> dict[str, str]:
        """`tied_weights()` minus ties into quantized layers: a quantized head keeps its own weight."""
        from .quantization import is_quantized_layer

        return {
            tied: source
            for tied, source in self.tied_weights().items()
            if not is_quantized_layer(self.get_submodule(tied.rpartition(".")[0]))
        }

    def tie_weights(self) -> None:
        for tied, source in self.active_ties().items():
            owner, _, name = tied.rpartition(".")
            setattr(self.get_submodule(owner), name, self.get_parameter(source))

    def _init_module(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Embedding) and module.sinusoidal:
            module.reset_parameters()
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, RMSNorm | nn.LayerNorm):
            module.reset_parameters()

    # ---- introspection ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes of parameters (and buffers): what the model holds, quantized layers at their packed size."""
        from .quantization import memory_footprint

        return memory_footprint(self, return_buffers)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        seen: set[int] = set()
        total = 0
        for module in self.modules():
            if exclude_embeddings and isinstance(module, nn.Embedding):
                continue
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
        return total

    # ---- loading ---------------------------------------------------------------------------------
    @classmethod
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
        with meta_init():
            model = cls(config)
        if getattr(cls, "spec_sources", None):  # built from a spec: bound its size before loading
            from .spec_models import check_size

            check_size(cls, config)
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

    @classmethod
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
        from .gguf import GGUFFile, read_gguf
        from .quantization import WeightOnlyConfig, prepare_weight_only, quantized_layers

        checkpoint = (
            source if isinstance(source, GGUFFile) else read_gguf(source, keep_quantized=not dequantize)
        )
        config = cls.config_class.from_dict(checkpoint.config)
        with meta_init():
            model = cls(config)
        target = _dtype(dtype) if dtype is not None else None
        layers = quantized_layers(checkpoint.tensors)
        if layers:
            bits = {b for b, _ in layers.values()}
            prepare_weight_only(model, WeightOnlyConfig(bits=min(bits)), layers)
        plan = resolve_device_map(model, device_map)
        model.load_tensors(checkpoint.tensors.items(), checkpoint.source, dtype=target, placement=plan)
        return model._choose_attention(attn_implementation).eval()

    def _choose_attention(self: M, name: str | None) -> M:
        """Use backend `name`, or the best one for the loaded dtype and device when None; checked now so an
        unusable choice fails at load time with the reason."""
        from .attention import check_attention
        from .hardware import best_attention

        weight = next((p for p in self.parameters() if p.device.type != "meta"), None)
        dtype, device = (
            (weight.dtype, weight.device) if weight is not None else (torch.float32, torch.device("cpu"))
        )
        name = best_attention(dtype, device) if name is None else name
        check_attention(name, dtype, device)
        return self.set_attention(name)

    def set_attention(self: M, name: str) -> M:
        """Compute attention with backend `name` ("sdpa", "eager", "flex_attention", "flash_attention_2",
        "specformer_cpu" or one added with `register_attention`), in this model and the models it holds."""
        from .attention import ATTENTION_BACKENDS

        if name not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attn_implementation `{name}` is not available; choose one of {sorted(ATTENTION_BACKENDS)}"
            )
        for module in self.modules():
            if isinstance(module, PreTrainedModel):
                module.attn_implementation = name
        return self

    def load_tensors(
        self,
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
        expected = {k: v for k, v in self.state_dict().items() if v.device.type == "meta"}
        tied = set(self.active_ties())
        prefix = self.base_model_prefix + "."
        has_backbone = hasattr(self, self.base_model_prefix) and isinstance(
            getattr(self, self.base_model_prefix), nn.Module
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
                elif self._ignorable(name):
                    continue
                elif not has_backbone and not name.startswith(prefix):
                    head_only.append(key)
                    continue
                else:
                    unexpected.append(key)
                    continue
            if tuple(tensor.shape) != tuple(expected[name].shape):
                mismatched.append(
                    f"{key}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[name].shape)}"
                )
                continue
            device = device_for(name, plan)
            if device.type == "meta":
                loaded[name] = expected[name]  # left unloaded, as asked
                continue
            if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            loaded[name] = tensor.to(device)
        if from_head_checkpoint:
            logger.info("%s: ignoring the checkpoint's head weights %s", type(self).__name__, head_only[:5])
        else:
            unexpected += head_only
        missing = [k for k in expected if k not in loaded and k not in tied]
        if not strict:
            if unexpected:
                logger.warning("%s: ignoring unexpected keys %s", type(self).__name__, unexpected[:12])
            if missing:
                logger.warning(
                    "%s: initialising keys the checkpoint lacks: %s", type(self).__name__, missing[:12]
                )
                self._materialize(missing, dtype, plan)
            missing, unexpected = [], []
        if missing or unexpected or mismatched:
            lines = [f"checkpoint {source} does not fit {type(self).__name__}:"]
            for title, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", mismatched),
            ):
                if keys:
                    shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
                    lines.append(f"  {title} keys: {shown}")
            raise CheckpointError("\n".join(lines))
        self.load_state_dict(loaded, strict=False, assign=True)
        self.tie_weights()  # assignment replaced the shared parameters; share them again
        for name, buffer in list(self.named_buffers()):  # rotary tables and such follow their module
            owner, _, attr = name.rpartition(".")
            device = device_for(name, plan)
            if device.type != "meta" and buffer.device != device:
                self.get_submodule(owner).register_buffer(attr, buffer.to(device), persistent=False)
        attach_device_hooks(self, plan)

    @staticmethod
    def _ignorable(key: str) -> bool:
        # Non-persistent buffers some exporters still write.
        return key.endswith((".rotary_emb.inv_freq", "embeddings.position_ids", ".masked_bias", ".attn.bias"))

    def _materialize(self, keys: list[str], dtype: torch.dtype | None, plan: dict[str, torch.device]) -> None:
        """Give freshly initialised storage to parameters the checkpoint did not have (non-strict loads)."""
        for key in keys:
            owner_name, _, _ = key.rpartition(".")
            owner = self.get_submodule(owner_name)
            owner.to_empty(device=device_for(key, plan), recurse=False)
            if dtype is not None:
                owner.to(dtype)
            self._init_module(owner)

    # ---- saving ----------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> Path:
        """Write config.json, safetensors weights (sharded past `max_shard_size`) and generation_config.json."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        tied = set(self.active_ties())
        state = {k: v for k, v in self.state_dict().items() if k not in tied}
        save_state_dict(state, directory, max_shard_size)
        self.config.architectures = [type(self).__name__]
        self.config.dtype = str(self.dtype).removeprefix("torch.")
        self.config.save_pretrained(directory)
        if getattr(type(self), "spec_sources", None):  # built from a spec: the checkpoint carries it
            from .spec_models import write_specs

            write_specs(type(self), directory)
        generation = self.generation_defaults()
        if generation:
            atomic_write_text(directory / GENERATION_CONFIG_NAME, json.dumps(generation, indent=2) + "\n")
        return directory

    def generation_defaults(self) -> dict[str, Any]:
        """Defaults for `generation_config.json`; only causal LMs have any."""
        return {}


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of every `repeat(...)` in the spec (the children of the model's ModuleLists): the units
    gradient checkpointing recomputes and FSDP shards."""
    return [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]


def _with_progress(
    tensors: Iterable[tuple[str, torch.Tensor]], files: list[Path], progress: bool | None
) -> Iterable[tuple[str, torch.Tensor]]:
    """A tqdm bar over the tensors for big checkpoints (over 200 MB) or when asked."""
    size = sum(f.stat().st_size for f in files)
    if progress is False or (progress is None and size < 200 * 2**20):
        return tensors
    from tqdm.auto import tqdm

    return tqdm(tensors, total=count_tensors(files), desc="Loading weights", unit="tensor", leave=False)


def generation_defaults(config: PretrainedConfig) -> dict[str, Any]:
    """The special-token ids a causal LM's `generation_config.json` carries."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}
