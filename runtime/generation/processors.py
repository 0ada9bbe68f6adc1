"""Logits processors with Hugging Face's semantics and order, so that scores and choices match it.

Each takes (sequences so far, scores) and returns new scores; `build_processors` assembles the list a
GenerationConfig asks for: penalties and constraints first, then (when sampling) the warpers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .config import GenerationConfig

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NEG_INF = -float("inf")


def repetition_penalty(penalty: float, prompt_start: torch.Tensor | None) -> Processor:
    """Divide positive (multiply negative) scores of tokens already present; padding does not count."""

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if prompt_start is not None:  # left padding: point pad positions at the row's last (real) token
            positions = torch.arange(ids.shape[1], device=ids.device)
            ids = torch.where(positions[None] < prompt_start[:, None], ids[:, -1:], ids)
        seen = scores.gather(1, ids)
        seen = torch.where(seen < 0, seen * penalty, seen / penalty)
        return scores.scatter(1, ids, seen)

    return apply


def no_repeat_ngram(size: int) -> Processor:
    """Ban the tokens that would complete an n-gram already in the sequence."""

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] + 1 < size:
            return scores
        scores = scores.clone()
        for row, tokens in enumerate(ids.tolist()):
            prefix = tuple(tokens[len(tokens) - size + 1 :]) if size > 1 else ()
            banned = {
                tokens[i + size - 1]
                for i in range(len(tokens) - size + 1)
                if tuple(tokens[i : i + size - 1]) == prefix
            }
            if banned:
                scores[row, list(banned)] = NEG_INF
        return scores

    return apply


def bad_words(words: list[list[int]]) -> Processor:
    """Ban single tokens outright, and the last token of longer sequences once their prefix is there."""
    single = [w[0] for w in words if len(w) == 1]
    longer = [w for w in words if len(w) > 1]

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        if single:
            scores[:, single] = NEG_INF
        for word in longer:
            prefix = torch.tensor(word[:-1], device=ids.device)
            if ids.shape[1] >= len(prefix):
                hit = (ids[:, ids.shape[1] - len(prefix) :] == prefix).all(dim=1)
                scores[hit, word[-1]] = NEG_INF
        return scores

    return apply


def suppress_eos_until(length: int, eos: list[int]) -> Processor:
    """min_length / min_new_tokens: no end of sequence before `length` tokens in all."""

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] < length:
            scores = scores.clone()
            scores[:, eos] = NEG_INF
        return scores

    return apply


def sequence_bias(biases: dict[tuple[int, ...], float]) -> Processor:
    """Add a bias to a sequence's last token when the tokens before it were just generated (a single
    token's bias applies always)."""

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bias = torch.zeros_like(scores)
        for sequence, value in biases.items():
            *prefix, last = sequence
            if not prefix:
                bias[:, last] += value
                continue
            if ids.shape[1] < len(prefix):
                continue
            tail = torch.tensor(prefix, device=ids.device)
            bias[:, last] += (ids[:, -len(prefix) :] == tail).all(dim=1).to(scores.dtype) * value
        return scores + bias

    return apply


def suppress(tokens: list[int], only_at: int | None = None) -> Processor:
    """Never pick `tokens` (at sequence length `only_at` only, when given: `begin_suppress_tokens`)."""
    index = torch.tensor(tokens)

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if only_at is not None and ids.shape[1] != only_at:
            return scores
        return scores.index_fill(1, index.to(scores.device), NEG_INF)

    return apply


def force_at(length: int, tokens: list[int]) -> Processor:
    """At sequence length `length`, only `tokens` may come next (forced BOS after a one-token prompt,
    forced EOS as the last token)."""
    allowed = torch.tensor(tokens)

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] != length:
            return scores
        forced = torch.full_like(scores, NEG_INF)
        forced[:, allowed.to(scores.device)] = 0
        return forced

    return apply


def _biases(value: Any) -> dict[tuple[int, ...], float]:
    items = value.items() if isinstance(value, dict) else value
    return {tuple([ids] if isinstance(ids, int) else ids): float(bias) for ids, bias in items}


def temperature(value: float) -> Processor:
    return lambda ids, scores: scores / value


def top_k(k: int, keep: int = 1) -> Processor:
    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        kth = torch.topk(scores, min(max(k, keep), scores.shape[-1]))[0][..., -1, None]
        return scores.masked_fill(scores < kth, NEG_INF)

    return apply


def top_p(p: float, keep: int = 1) -> Processor:
    """Keep the smallest set of most likely tokens whose probability reaches p."""

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - p)
        remove[..., -keep:] = False
        return scores.masked_fill(remove.scatter(1, order, remove), NEG_INF)

    return apply


def min_p(p: float, keep: int = 1) -> Processor:
    """Drop tokens less likely than p times the most likely one."""

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        remove = probs < p * probs.amax(dim=-1, keepdim=True)
        order = torch.argsort(scores, descending=True, dim=-1)
        sorted_remove = remove.gather(1, order)
        sorted_remove[..., :keep] = False
        return scores.masked_fill(sorted_remove.scatter(1, order, sorted_remove), NEG_INF)

    return apply


def typical_p(mass: float, keep: int = 1) -> Processor:
    """Locally typical sampling: keep tokens whose surprise is closest to the entropy."""

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = scores.log_softmax(dim=-1)
        entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
        shifted, order = torch.sort((-logp - entropy).abs(), descending=False)
        cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
        last = (cumulative < mass).sum(dim=1).clamp_(max=shifted.shape[-1] - 1)
        remove = shifted > shifted.gather(1, last.view(-1, 1))
        remove[..., :keep] = False
        return scores.masked_fill(remove.scatter(1, order, remove), NEG_INF)

    return apply


def build_processors(
    config: GenerationConfig, prompt_length: int, prompt_start: torch.Tensor | None, max_length: int = 0
) -> list[Processor]:
    """The processors `config` asks for, in Hugging Face's order."""
    processors: list[Processor] = []
    if config.sequence_bias:
        processors.append(sequence_bias(_biases(config.sequence_bias)))
    if config.repetition_penalty != 1.0:
        processors.append(repetition_penalty(config.repetition_penalty, prompt_start))
    if config.no_repeat_ngram_size > 0:
        processors.append(no_repeat_ngram(config.no_repeat_ngram_size))
    if config.bad_words_ids:
        processors.append(bad_words(config.bad_words_ids))
    eos = config.eos_ids()
    if eos and config.min_length > 0:
        processors.append(suppress_eos_until(config.min_length, eos))
    if eos and config.min_new_tokens:
        processors.append(suppress_eos_until(prompt_length + config.min_new_tokens, eos))
    if config.forced_bos_token_id is not None:
        processors.append(force_at(1, [config.forced_bos_token_id]))
    if config.forced_eos_token_id is not None and max_length:
        forced = config.forced_eos_token_id
        processors.append(force_at(max_length - 1, [forced] if isinstance(forced, int) else list(forced)))
    if config.suppress_tokens:
        processors.append(suppress(config.suppress_tokens))
    if config.begin_suppress_tokens:
        processors.append(suppress(config.begin_suppress_tokens, only_at=prompt_length))
    if config.do_sample:
        keep = 2 if config.num_beams > 1 else 1  # beam sampling needs at least two candidates per beam
        if config.temperature != 1.0:
            processors.append(temperature(config.temperature))
        if config.top_k:
            processors.append(top_k(config.top_k, keep))
        if config.top_p < 1.0:
            processors.append(top_p(config.top_p, keep))
        if config.min_p is not None:
            processors.append(min_p(config.min_p, keep))
        if config.typical_p < 1.0:
            processors.append(typical_p(config.typical_p, keep))
    return processors


def apply_all(processors: list[Processor], ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    for processor in processors:
        scores = processor(ids, scores)
    return scores
