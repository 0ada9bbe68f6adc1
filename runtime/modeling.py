"""The model base class: weight initialisation, tying, attention and kernel choice; loading and saving
come from `loading.py`."""

from __future__ import annotations

import logging
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from . import loading
from .config import PretrainedConfig
from .errors import ArgumentError
from .generation.config import GenerationConfig
from .layers import Embedding, RMSNorm, TransposedLinear
from .moe import Experts
from .output_options import OPTIONS, backbone_of, call_with_options
from .quantization import PackedEmbedding, is_quantized_layer, memory_footprint

M = TypeVar("M", bound="PreTrainedModel")
logger = logging.getLogger(__name__)


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
        self.attn_implementation: str = config.attn_implementation or self._default_attention(
            "specformer_cpu"
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if "cache" in kwargs:  # transformers 5's name for past_key_values
            kwargs["past_key_values"] = kwargs.pop("cache")
        if kwargs.keys() & OPTIONS or getattr(self.config, "output_router_logits", False):
            # transformers' output options, applied around the forward
            return call_with_options(self, super().__call__, args, kwargs)
        return super().__call__(*args, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding | PackedEmbedding:
        """The token embedding table: the backbone's first embedding."""
        return next(m for m in backbone_of(self).modules() if isinstance(m, nn.Embedding | PackedEmbedding))

    @property
    def attention_features(self) -> frozenset[str]:
        """What the spec's attention needs beyond masking (`softcap`); backends lacking it are refused.
        Generated models that need something override this (a class attribute, or a property when the
        config decides)."""
        return frozenset()

    def _default_attention(self, preferred: str) -> str:
        """`preferred`, or eager attention when the spec needs what `preferred` cannot do."""
        from .attention import missing_features

        return "eager" if missing_features(preferred, self.attention_features) else preferred

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
        if isinstance(module, nn.Linear | TransposedLinear):
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
        elif isinstance(module, Experts):
            module.init_weights(std)

    # ---- introspection ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes of parameters (and buffers): what the model holds, quantized layers at their packed size."""
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

    def _choose_attention(self: M, name: str | None) -> M:
        """Use backend `name`, or the best one for the loaded dtype and device when None; checked now so an
        unusable choice fails at load time with the reason."""
        from .attention import check_attention
        from .hardware import best_attention

        weight = next((p for p in self.parameters() if p.device.type != "meta"), None)
        dtype, device = (
            (weight.dtype, weight.device) if weight is not None else (torch.float32, torch.device("cpu"))
        )
        name = self._default_attention(best_attention(dtype, device)) if name is None else name
        check_attention(name, dtype, device)
        return self.set_attention(name)

    def set_attention(self: M, name: str) -> M:
        """Compute attention with backend `name` ("sdpa", "eager", "flex_attention", "flash_attention_2",
        "specformer_cpu" or one added with `register_attention`), in this model and the models it holds."""
        from .attention import ATTENTION_BACKENDS, missing_features

        if name not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attn_implementation `{name}` is not available; choose one of {sorted(ATTENTION_BACKENDS)}"
            )
        lacking = missing_features(name, self.attention_features)
        if lacking:
            raise ValueError(
                f"attn_implementation `{name}` cannot do what {type(self).__name__}'s attention needs "
                f"({', '.join(sorted(lacking))}); use 'eager' or 'flex_attention'"
            )
        for module in self.modules():
            if isinstance(module, PreTrainedModel):
                module.attn_implementation = name
        return self

    # ---- loading and saving (runtime/loading.py) -----------------------------------------------------
    from_pretrained = classmethod(loading.from_pretrained)
    from_gguf = classmethod(loading.from_gguf)
    load_tensors = loading.load_tensors
    save_pretrained = loading.save_pretrained

    def generation_defaults(self) -> dict[str, Any]:
        """Defaults for `generation_config.json`; only causal LMs have any."""
        return {}

    # ---- generation (runtime/generation: the engine) --------------------------------------------------
    def can_generate(self) -> bool:
        """Whether this is a causal LM (its class defines generation defaults)."""
        return type(self).generation_defaults is not PreTrainedModel.generation_defaults

    @property
    def generation_config(self) -> GenerationConfig:
        """Decoding defaults: the checkpoint's generation_config.json, else the config's special tokens."""
        if "_generation_config" not in self.__dict__:
            self._generation_config = GenerationConfig.from_model_config(self.config)
        return self._generation_config

    @generation_config.setter
    def generation_config(self, value: GenerationConfig) -> None:
        self._generation_config = value

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: list[Any] | None = None,
        stopping_criteria: list[Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """transformers' `model.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=20)`: the
        prompt ids (positional `inputs` or `input_ids=`), `attention_mask`, GenerationConfig fields over
        `generation_config` (default: `self.generation_config`), `past_key_values` from a previous turn,
        `streamer`, `assistant_model`, and lists of logits processors and stopping criteria. Returns the
        sequences, or a GenerateOutput with `return_dict_in_generate=True`."""
        from .generation import generate

        if not self.can_generate():
            raise ArgumentError(f"{type(self).__name__} is not a causal language model; generate() needs one")
        input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
        if "cache" in kwargs:  # transformers 5's name for past_key_values
            kwargs["past_key_values"] = kwargs.pop("cache")
        if input_ids is None:
            raise ArgumentError("generate() needs the prompt: input_ids (or inputs) of shape (batch, length)")
        return generate(
            self,
            input_ids,
            kwargs.pop("attention_mask", None),
            generation_config=generation_config or self.generation_config,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            **kwargs,
        )


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of every `repeat(...)` in the spec (the children of the model's ModuleLists): the units
    gradient checkpointing recomputes and FSDP shards."""
    return [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]


def generation_defaults(config: PretrainedConfig) -> dict[str, Any]:
    """The special-token ids a causal LM's `generation_config.json` carries."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}
