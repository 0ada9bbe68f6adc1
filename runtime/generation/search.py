"""The decoding loops: greedy and multinomial sampling, and beam search (with or without sampling).

Both run batched with left padding: positions come from the attention mask (as Hugging Face computes
them), finished rows are padded, and a KV cache carries the past so each step feeds one token per row.
Beam search follows Hugging Face's vectorised algorithm step for step, so that ties, length penalty and
early stopping choose the same sequences.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..cache import Cache, DynamicCache, StaticCache
from ..errors import GenerationError
from .config import GenerationConfig
from .processors import Processor, apply_all

BIG_NEGATIVE = -1.0e9


@dataclass
class GenerateOutput:
    """What `generate(..., return_dict_in_generate=True)` returns, with Hugging Face's field names."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    sequences_scores: torch.Tensor | None = None
    past_key_values: Cache | None = None

    @property
    def cache(self) -> Cache | None:
        """transformers 5's name for `past_key_values`."""
        return self.past_key_values


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position counting real tokens only (left padding does not shift the positions)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


class Stop:
    """Stopping criteria per row: end-of-sequence tokens, length, wall time, stop strings."""

    def __init__(
        self,
        config: GenerationConfig,
        max_length: int,
        tokenizer: object | None,
        criteria: list[Callable[..., Any]] | None = None,
    ) -> None:
        self.criteria = list(criteria or [])  # transformers-style StoppingCriteria: (ids, scores) -> bools
        self.eos = config.eos_ids()
        self.max_length = max_length
        self.deadline = None if config.max_time is None else time.monotonic() + config.max_time
        strings = config.stop_strings
        self.strings = [strings] if isinstance(strings, str) else list(strings or [])
        if self.strings and tokenizer is None:
            raise GenerationError("stop_strings need the tokenizer: generate(..., tokenizer=tokenizer)")
        self.tokenizer = tokenizer
        self._eos: dict[torch.device, torch.Tensor] = {}

    def __call__(self, sequences: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """(rows,) bool: which rows are done after their last token."""
        done = self.ended(sequences, scores)
        if done is None:
            return torch.zeros(sequences.shape[0], dtype=torch.bool, device=sequences.device)
        return done

    def ended(self, sequences: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor | None:
        """Which rows are done after their last token, or None when no criterion can end any row now
        (a decoding loop's common case, at no tensor op)."""
        marks = [torch.as_tensor(c(sequences, scores), device=sequences.device).bool() for c in self.criteria]
        if sequences.shape[1] >= self.max_length or (
            self.deadline is not None and time.monotonic() > self.deadline
        ):
            return torch.ones(sequences.shape[0], dtype=torch.bool, device=sequences.device)
        if self.eos:
            device = sequences.device
            if device not in self._eos:
                self._eos[device] = torch.tensor(self.eos, device=device)
            marks.append(torch.isin(sequences[:, -1], self._eos[device]))
        if self.strings:
            tails = [self.tokenizer.decode(row[-16:].tolist()) for row in sequences]  # type: ignore[attr-defined]
            marks.append(
                torch.tensor(
                    [any(s in tail for s in self.strings) for tail in tails], device=sequences.device
                )
            )
        if not marks:
            return None
        done = marks[0].expand(sequences.shape[0])
        for mark in marks[1:]:
            done = done | mark
        return done


def _step(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    cache: Cache | None,
    decode: Callable[..., object] | None = None,
) -> torch.Tensor:
    """Logits (rows, vocab) for the next token, feeding what the cache does not hold yet: the whole
    prompt first (or a new chat turn after a previous turn's cache), then one token. Without a cache
    (`use_cache=False`) the whole sequence every time. A static cache gets a mask over all its slots
    (fixed shape); `decode` runs the one-token steps."""
    positions = positions_from_mask(mask)
    if cache is None:
        out = model(tokens, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        return out.logits[:, -1].float()
    seen = int(cache.get_seq_length())
    if seen:  # fresh tensors, so a compiled step sees the same strides every time
        fresh = torch.contiguous_format
        tokens, positions = (
            tokens[:, seen:].clone(memory_format=fresh),
            positions[:, seen:].clone(memory_format=fresh),
        )
    mask = _slot_mask(mask, cache)
    step = decode if decode is not None and seen and tokens.shape[1] == 1 else model
    out = step(tokens, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
               logits_to_keep=1)  # fmt: skip
    return out.logits[:, -1].float()


def sample_or_greedy(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    config: GenerationConfig,
    processors: list[Processor],
    stop: Stop,
    cache: Cache | None,
    streamer: object | None,
    generator: torch.Generator | None,
    on_token: Callable[[int], None] | None = None,
    decode: Callable[..., object] | None = None,
) -> GenerateOutput:
    if config.use_cache and cache is None:
        cache = DynamicCache(config.cache_dtype())
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_ids() or [0])[0]
    sequences = input_ids
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    all_running = True  # no row has finished (so no token needs replacing by padding)
    scores: list[torch.Tensor] = []
    raw: list[torch.Tensor] = []
    token_steps: _TokenSteps | None = None
    while True:
        if token_steps is not None:
            logits = token_steps(sequences[:, -1], mask)
        else:
            logits = _step(model, sequences, mask, cache, decode if cache is not None else None)
        next_scores = apply_all(processors, sequences, logits)
        if config.output_scores:
            scores.append(next_scores)
        if config.output_logits:
            raw.append(logits)
        if config.do_sample:
            probs = next_scores.softmax(dim=-1)
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            tokens = next_scores.argmax(dim=-1)
        if not all_running:
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
        sequences = torch.cat((sequences, tokens[:, None]), dim=1)
        mask = torch.cat((mask, mask.new_ones(mask.shape[0], 1)), dim=1)
        if streamer is not None:
            streamer.put(tokens.cpu())  # type: ignore[attr-defined]
        if on_token is not None:  # a callback for the first row, as the command line streams
            on_token(int(tokens[0]))
        ended = stop.ended(sequences, next_scores)
        if ended is not None and bool(ended.any()):
            unfinished &= ~ended
            all_running = False
            if not bool(unfinished.any()):
                break
        if cache is not None and token_steps is None:
            token_steps = _TokenSteps(decode if decode is not None else model, mask, cache)
    if streamer is not None:
        streamer.end()  # type: ignore[attr-defined]
    return GenerateOutput(
        sequences=sequences,
        scores=tuple(scores) if config.output_scores else None,
        logits=tuple(raw) if config.output_logits else None,
        past_key_values=cache,
    )


def _slot_mask(mask: torch.Tensor, cache: Cache) -> torch.Tensor:
    """The attention mask as the cache reads it: a static cache's covers all its slots (fixed shape),
    those past the sequence marked real (unwritten ones are masked by position)."""
    if not isinstance(cache, StaticCache):
        return mask
    slots = mask.new_ones(mask.shape[0], cache.max_length)
    slots[:, : mask.shape[1]] = mask
    return slots


class _TokenSteps:
    """The steps after the first over a cache, each feeding one new token per row (always a real one):
    each row's position is one past its last, and a static cache's slot mask does not change (its slots
    past the prompt are marked real already). Derived from the whole mask every step, as the first step
    derives them, they cost a dozen small tensor ops a token."""

    def __init__(self, run: Callable[..., Any], mask: torch.Tensor, cache: Cache) -> None:
        self.run, self.cache = run, cache
        self.positions = positions_from_mask(mask)[:, -1:].clone(memory_format=torch.contiguous_format)
        self.slots = _slot_mask(mask, cache) if isinstance(cache, StaticCache) else None

    def __call__(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The next logits (rows, vocab) after `tokens` (rows,), with `mask` covering them."""
        fresh = torch.contiguous_format  # the same strides every step, as a compiled step expects
        out = self.run(tokens[:, None].clone(memory_format=fresh), position_ids=self.positions,
                       attention_mask=mask if self.slots is None else self.slots, past_key_values=self.cache,
                       use_cache=True, logits_to_keep=1)  # fmt: skip
        self.positions = self.positions + 1
        return out.logits[:, -1].float()


def _gather(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tensor (batch, beams, ...) gathered along beams by indices (batch, k)."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return tensor.gather(1, indices.expand(*indices.shape[:2], *tensor.shape[2:]))


def beam_search(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    config: GenerationConfig,
    processors: list[Processor],
    max_length: int,
    generator: torch.Generator | None,
) -> GenerateOutput:
    """Beam search over `num_beams` beams per row (rows of `input_ids` already repeated per beam)."""
    beams = config.num_beams
    rows, prompt_len = input_ids.shape
    batch = rows // beams
    eos = config.eos_ids()
    keep = max(2, 1 + len(eos)) * beams  # enough candidates that `beams` survive finishing ones
    top_beams = torch.cat((torch.ones(beams, dtype=torch.bool), torch.zeros(keep - beams, dtype=torch.bool)))
    fill = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else -1)
    device = input_ids.device
    running = torch.full((batch, beams, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = input_ids.view(batch, beams, prompt_len)
    finished = running.clone()
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = BIG_NEGATIVE  # all beams start identical: only the first one is live
    finished_scores = torch.full((batch, beams), BIG_NEGATIVE, device=device)
    is_finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    origins = torch.full((batch, beams, max_length - prompt_len), -1, dtype=torch.long, device=device)
    finished_origins = origins.clone()
    cache = DynamicCache(config.cache_dtype())
    scores: list[torch.Tensor] = []
    cur = prompt_len
    while True:
        flat = running[:, :, :cur].reshape(rows, cur)
        logits = _step(model, flat, mask, cache)
        log_probs = apply_all(processors, flat, F.log_softmax(logits, dim=-1))
        if config.output_scores:
            scores.append(log_probs)
        vocab = log_probs.shape[-1]
        totals = (log_probs.view(batch, beams, vocab) + running_scores[:, :, None]).view(batch, beams * vocab)
        if config.do_sample:
            picked = torch.multinomial(totals.softmax(dim=-1), keep, generator=generator)
            top_scores = totals.gather(1, picked)
        else:
            top_scores, picked = torch.topk(totals, keep)
        source = picked // vocab
        candidates = _gather(running, source)
        candidates[:, :, cur] = picked % vocab
        candidate_origins = _gather(origins, source)
        candidate_origins[:, :, cur - prompt_len] = (
            source + torch.arange(batch, device=device)[:, None] * beams
        )
        hits = torch.zeros_like(top_scores, dtype=torch.bool)
        if eos:
            hits |= torch.isin(candidates[:, :, cur], torch.tensor(eos, device=device))
        if cur + 1 >= max_length:
            hits |= True
        # the best live continuations carry on
        live_scores = top_scores + hits.float() * BIG_NEGATIVE
        best = torch.topk(live_scores, beams)[1]
        running, running_scores, origins = (
            _gather(candidates, best),
            _gather(live_scores, best),
            _gather(candidate_origins, best),
        )
        # candidates that just finished among the top `beams` compete with the finished ones
        just_finished = hits & top_beams[None].to(device)
        normalised = top_scores / ((cur + 1 - prompt_len) ** config.length_penalty)
        full = is_finished.all(dim=-1, keepdim=True) & (config.early_stopping is True)
        normalised = normalised + full.float() * BIG_NEGATIVE + (~improvable).float() * BIG_NEGATIVE
        normalised = normalised + (~just_finished).float() * BIG_NEGATIVE
        merged_scores = torch.cat((finished_scores, normalised), dim=1)
        chosen = torch.topk(merged_scores, beams)[1]
        finished = _gather(torch.cat((finished, candidates), dim=1), chosen)
        finished_scores = _gather(merged_scores, chosen)
        finished_origins = _gather(torch.cat((finished_origins, candidate_origins), dim=1), chosen)
        is_finished = _gather(torch.cat((is_finished, just_finished), dim=1), chosen)
        cache.reorder(origins[:, :, cur - prompt_len].reshape(-1))
        mask = torch.cat((mask, mask.new_ones(rows, 1)), dim=1)
        cur += 1
        # could a live beam still beat the worst finished one?
        if config.early_stopping == "never" and config.length_penalty > 0.0:
            best_length = max_length - prompt_len
        else:
            best_length = cur - prompt_len
        best_possible = running_scores[:, :1] / (best_length**config.length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], -1.0e9)
        improvable = improvable & (best_possible > worst_finished).any(dim=-1, keepdim=True)
        open_beams = not (bool(is_finished.all()) and config.early_stopping is True)
        if not (bool(improvable.any()) and open_beams and not bool(hits.all())):
            break
    n = config.num_return_sequences
    sequences = finished[:, :n].reshape(batch * n, -1)
    lengths = (finished_origins[:, :n].reshape(batch * n, -1) + 1).bool().sum(dim=1).max()
    return GenerateOutput(
        sequences=sequences[:, : prompt_len + int(lengths)],
        scores=tuple(scores) if config.output_scores else None,
        sequences_scores=finished_scores[:, :n].reshape(-1),
        past_key_values=cache,
    )
