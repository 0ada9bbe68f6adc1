"""`generate()`: greedy, sampling, beam search and beam sampling for every generated causal LM."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..cache import (
    CACHES,
    Cache,
    DynamicCache,
    OffloadedCache,
    QuantizedCache,
    SinkCache,
    SlidingWindowCache,
    StaticCache,
)
from ..errors import GenerationError
from ..fused_decode import FusedDecoder, fused_decoder
from .config import GENERATION_CONFIG_NAME, GenerationConfig
from .processors import build_processors
from .search import GenerateOutput, Stop, beam_search, positions_from_mask, sample_or_greedy
from .speculative import draft_model_proposer, prompt_lookup_proposer, speculative_decode
from .streamers import TextIteratorStreamer, TextStreamer

__all__ = [
    "GENERATION_CONFIG_NAME",
    "GenerateOutput",
    "GenerationConfig",
    "TextIteratorStreamer",
    "TextStreamer",
    "generate",
    "positions_from_mask",
]


def compiled_decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The model's forward compiled for one-token steps, built once per model and reused."""
    compiled = model.__dict__.get("_specformer_compiled")
    if compiled is None:
        # Dynamo's guards already check every input's size and stride before a step runs; inductor's
        # own asserts would check the hundreds of inputs again on every token.
        options = {"size_asserts": False}
        if next(model.parameters()).device.type == "cpu":
            # On the CPU a step is hundreds of small kernel calls; driven from C++ rather than from
            # inductor's Python wrapper each costs less (`bench/generate.py --inductor` measures it), for
            # a longer first compile (cached on disk by inductor like any graph).
            options["cpp_wrapper"] = True
        compiled = torch.compile(model, fullgraph=True, dynamic=False, options=options)
        model.__dict__["_specformer_compiled"] = compiled
    return compiled


def compiled_step(
    model: torch.nn.Module, cache: Cache | None, input_ids: torch.Tensor, how: bool | str
) -> FusedDecoder | torch.nn.Module:
    """What runs the one-token steps for `compile=how`: True takes the fused CPU decode step where the
    model's decoder has one and it applies, else `torch.compile`; "inductor" always `torch.compile`."""
    if how not in (True, "inductor"):
        raise GenerationError(f"compile={how!r}: expected True, False or 'inductor'")
    if not isinstance(cache, StaticCache):
        raise GenerationError("compile=True needs fixed shapes: use cache_implementation='static'")
    fused = fused_decoder(model, input_ids.shape[0]) if how is True else None
    if fused is not None:
        return fused
    if getattr(model, "attn_implementation", None) == "flex_attention" and input_ids.device.type == "cpu":
        # measured with torch 2.13: inductor fails with "NoValidChoicesError" while compiling it
        raise GenerationError(
            "compile=True with attn_implementation='flex_attention' does not compile on the CPU (torch's "
            "inductor has no CPU kernel for it); load the model with attn_implementation='sdpa' to decode "
            "compiled: the same attention"
        )
    return compiled_decoder(model)


STATIC_CACHE_BUCKET = 128


def make_cache(model: torch.nn.Module, config: GenerationConfig, max_length: int) -> Cache:
    """The cache `config.cache_implementation` names, sized from the model and `config.cache_config`."""
    name = config.cache_implementation
    options = config.cache_config or {}
    if config.cache_dtype() is not None and name != "static":
        raise GenerationError(
            f"cache_config dtype: the dynamic and static caches store in another dtype; `{name}` keeps its own"
        )
    if name == "static":
        # Slots rounded up to a multiple of STATIC_CACHE_BUCKET: the compiled step specialises on the
        # cache's size, so requests of nearby lengths share one compilation instead of paying one each.
        slots = -(-max_length // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET
        return StaticCache(options.get("max_length", slots), config.cache_dtype())
    if name == "sliding_window":
        window = options.get("window", getattr(model.config, "sliding_window", None))
        layer_types = getattr(model.config, "layer_types", None)
        if window is None or (layer_types and set(layer_types) != {"sliding_attention"}):
            raise GenerationError(
                "the sliding-window cache drops what every layer's window has passed; this model has no "
                "window on every layer (use cache_implementation='sink' to bound memory anyway)"
            )
        return SlidingWindowCache(window)
    if name == "sink":
        return SinkCache(options.get("window", 256), options.get("sink", 4))
    if name == "quantized":
        return QuantizedCache(options.get("nbits", 4), options.get("residual_length", 128))
    if name == "offloaded":
        return OffloadedCache()
    raise GenerationError(f"cache_implementation `{name}`: expected one of {', '.join(sorted(CACHES))}")


def check_inputs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> None:
    """Prompts the model can read: (batch, length) integer ids inside its vocabulary, a mask of the same
    shape. Checked here, where the error can name the argument, not deep inside an embedding lookup."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise GenerationError(f"input_ids is {shape}; expected a (batch, prompt_length) tensor, length >= 1")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise GenerationError(f"input_ids has dtype {input_ids.dtype}; expected integer token ids")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or (isinstance(vocab, int) and high >= vocab):
        bad = low if low < 0 else high
        raise GenerationError(
            f"input_ids holds token id {bad}; the model's vocabulary has ids 0 to {vocab - 1}"
        )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise GenerationError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected input_ids' {tuple(input_ids.shape)}"
        )


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    generation_config: GenerationConfig | None = None,
    streamer: TextStreamer | None = None,
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
    past_key_values: Cache | None = None,
    on_token: Any = None,
    assistant_model: torch.nn.Module | None = None,
    prompt_lookup_num_tokens: int | None = None,
    num_assistant_tokens: int = 5,
    compile: bool | str = False,
    logits_processor: list[Any] | None = None,
    stopping_criteria: list[Any] | None = None,
    **settings: Any,
) -> torch.Tensor | GenerateOutput:
    """Continue each (left-padded) prompt; returns the sequences, or a GenerateOutput when
    `return_dict_in_generate=True`. Settings are GenerationConfig fields (`max_new_tokens=32`, ...);
    `generation_config` defaults to the model's special tokens; `tokenizer` is needed for stop_strings.
    `assistant_model` (a small draft model) or `prompt_lookup_num_tokens` decode speculatively: the same
    tokens as plain greedy decoding (or the same distribution when sampling), in fewer forward passes.
    On the CPU, models whose package registers their decoder (`register_decoder`) decode each new token
    in one fused kernel call over the dynamic or static cache (runtime/fused_decode.py); others run their
    forward.
    `compile=True` (with `cache_implementation="static"`) runs the one-token steps compiled: through
    specformer's fused decode step on the CPU where the model's decoder has one (nothing to compile),
    else `torch.compile` (fixed shapes, traced once, replayed for every token); `compile="inductor"`
    always takes `torch.compile`.
    `logits_processor` and `stopping_criteria` are lists of transformers-style callables, `(input_ids,
    scores) -> scores` run after the configured processors, and `(input_ids, scores) -> bool or (rows,)
    bools` that end rows."""
    check_inputs(model, input_ids, attention_mask)
    base = generation_config or GenerationConfig.from_model_config(getattr(model, "config", None))
    config = base.update(**settings)
    config.validate()
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    if bool((mask[:, -1] == 0).any()):
        # each row continues from the batch's last column: after right padding that is a pad token
        warnings.warn(
            "generate(): attention_mask ends in padding (the batch is right-padded), so those rows continue "
            "after their pad tokens; pad prompts on the left (tokenizer padding_side='left')",
            UserWarning,
            stacklevel=2,
        )
    prompt_len = input_ids.shape[1]
    max_length = (
        prompt_len + config.max_new_tokens if config.max_new_tokens is not None else config.max_length
    )
    if max_length <= prompt_len:
        raise GenerationError(
            f"the prompt has {prompt_len} tokens and max_length is {max_length}: nothing to generate; "
            "set max_new_tokens"
        )
    prompt_start = (mask != 0).int().argmax(dim=1) if bool((mask == 0).any()) else None
    if past_key_values is None and config.cache_implementation not in (None, "dynamic"):
        past_key_values = make_cache(model, config, max_length)
    processors = build_processors(config, prompt_len, prompt_start, max_length) + list(logits_processor or [])
    if assistant_model is not None or prompt_lookup_num_tokens:
        if config.num_beams > 1 or streamer is not None or past_key_values is not None or compile:
            raise GenerationError(
                "speculative decoding supports greedy and sampling with its own dynamic caches, "
                "without streaming or compile"
            )
        propose = (
            draft_model_proposer(assistant_model, num_assistant_tokens, config)
            if assistant_model is not None
            else prompt_lookup_proposer(lookahead=prompt_lookup_num_tokens or 10)
        )
        stop = Stop(config, max_length, tokenizer, stopping_criteria)
        output = speculative_decode(model, input_ids, config, processors, stop, propose, generator)
    elif config.num_beams > 1:
        if config.cache_implementation not in (None, "dynamic"):
            raise GenerationError("beam search reorders its cache every step; use the dynamic cache")
        if streamer is not None:
            raise GenerationError("streaming shows one sequence as it grows; beam search has several")
        rows_ids = input_ids.repeat_interleave(config.num_beams, dim=0)
        rows_mask = mask.repeat_interleave(config.num_beams, dim=0)
        if prompt_start is not None:
            processors = build_processors(
                config, prompt_len, prompt_start.repeat_interleave(config.num_beams), max_length
            ) + list(logits_processor or [])
        output = beam_search(model, rows_ids, rows_mask, config, processors, max_length, generator)
    else:
        n = config.num_return_sequences
        if n > 1:
            input_ids, mask = input_ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)
            if prompt_start is not None:
                processors = build_processors(
                    config, prompt_len, prompt_start.repeat_interleave(n), max_length
                ) + list(logits_processor or [])
        if streamer is not None:
            streamer.put(input_ids.cpu())
        stop = Stop(config, max_length, tokenizer, stopping_criteria)
        if compile:
            decode = compiled_step(model, past_key_values, input_ids, compile)
        elif past_key_values is None or type(past_key_values) in (DynamicCache, StaticCache):
            decode = fused_decoder(model, input_ids.shape[0])  # None where it does not apply
        else:
            decode = None
        output = sample_or_greedy(
            model,
            input_ids,
            mask,
            config,
            processors,
            stop,
            past_key_values,
            streamer,
            generator,
            on_token,
            decode,
        )
    return output if config.return_dict_in_generate else output.sequences
