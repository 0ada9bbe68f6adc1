"""Speculative decoding: cheap proposals checked by the model in one forward pass.

A proposer guesses the next few tokens, from a small draft model (assisted decoding) or from an earlier
occurrence of the last n-gram (prompt lookup). The model scores all of them at once; greedy decoding
keeps the longest prefix it agrees with plus its own next token, so the output is exactly the model's
greedy output. With sampling, each draft token is kept with probability min(1, p/q) and a rejection is
resampled from max(0, p - q), which leaves the model's distribution unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..cache import DynamicCache
from ..errors import GenerationError
from .config import GenerationConfig
from .processors import Processor, apply_all
from .search import GenerateOutput, Stop

# proposer(sequence (1, T)) -> (draft tokens (k,), draft probabilities (k, vocab) or None)
Proposer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def draft_model_proposer(draft: torch.nn.Module, lookahead: int, config: GenerationConfig) -> Proposer:
    """Greedy (or sampled, with its probabilities) proposals from a smaller model sharing the tokenizer."""
    cache = DynamicCache(config.cache_dtype())

    def propose(sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache.crop(min(cache.get_seq_length(), sequence.shape[1] - 1))
        tokens = sequence[:, cache.get_seq_length() :]
        proposed, probs = [], []
        for _ in range(lookahead):
            past = cache.get_seq_length()
            positions = torch.arange(past, past + tokens.shape[1], device=tokens.device)[None]
            logits = draft(
                tokens, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1
            )
            scores = logits.logits[:, -1].float()
            if config.do_sample:
                p = (scores / max(config.temperature, 1e-6)).softmax(dim=-1)
                token = torch.multinomial(p, 1)
                probs.append(p[0])
            else:
                token = scores.argmax(dim=-1, keepdim=True)
            proposed.append(token[0, 0])
            tokens = token
        return torch.stack(proposed), (torch.stack(probs) if probs else None)

    return propose


def prompt_lookup_proposer(max_ngram: int = 3, lookahead: int = 10) -> Proposer:
    """Propose what followed the most recent earlier occurrence of the sequence's last n-gram."""

    def propose(sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = sequence[0]
        for n in range(max_ngram, 0, -1):
            if tokens.shape[0] <= n:
                continue
            windows = tokens.unfold(0, n, 1)[:-1]  # every earlier n-gram
            hits = (windows == tokens[-n:]).all(dim=1).nonzero().flatten()
            for start in hits.flip(0).tolist():
                follow = tokens[start + n : start + n + lookahead]
                if follow.numel():
                    return follow, None
        return tokens.new_empty(0), None

    return propose


def speculative_decode(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    processors: list[Processor],
    stop: Stop,
    propose: Proposer,
    generator: torch.Generator | None,
) -> GenerateOutput:
    if input_ids.shape[0] != 1:
        raise GenerationError("speculative decoding runs one sequence at a time (batch size 1)")
    cache = DynamicCache(config.cache_dtype())
    sequence = input_ids
    fed = 0  # how many tokens of `sequence` the model's cache holds
    while True:
        draft, draft_probs = propose(sequence)
        room = stop.max_length - sequence.shape[1] - 1
        draft, draft_probs = (
            draft[: max(room, 0)],
            None if draft_probs is None else draft_probs[: max(room, 0)],
        )
        candidate = torch.cat((sequence, draft[None]), dim=1)
        positions = torch.arange(fed, candidate.shape[1], device=candidate.device)[None]
        logits = model(
            candidate[:, fed:], position_ids=positions, past_key_values=cache, use_cache=True
        ).logits
        logits = logits[0, -(draft.numel() + 1) :].float()  # predictions for each draft slot and one more
        scores = torch.stack(
            [
                apply_all(processors, candidate[:, : sequence.shape[1] + i], logits[i : i + 1])[0]
                for i in range(len(logits))
            ]
        )
        accepted = _accept(draft, draft_probs, scores, config, generator)
        sequence = torch.cat((sequence, accepted[None]), dim=1)
        cache.crop(sequence.shape[1] - 1)
        fed = sequence.shape[1] - 1
        finished = False
        for end in range(sequence.shape[1] - accepted.numel() + 1, sequence.shape[1] + 1):
            if bool(stop(sequence[:, :end])[0]):
                sequence, finished = sequence[:, :end], True
                break
        if finished:
            break
    return GenerateOutput(sequences=sequence, past_key_values=cache)


def _accept(
    draft: torch.Tensor,
    draft_probs: torch.Tensor | None,
    scores: torch.Tensor,
    config: GenerationConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The tokens this round adds: the agreed prefix of the draft, then one token of the model's own."""
    if not config.do_sample:
        choice = scores.argmax(dim=-1)
        agree = (choice[: draft.numel()] == draft).long().cumprod(dim=0).sum()
        return torch.cat((draft[:agree], choice[agree : agree + 1]))
    probs = scores.softmax(dim=-1)
    kept: list[torch.Tensor] = []
    for i, token in enumerate(draft):
        p = probs[i, token]
        q = draft_probs[i, token] if draft_probs is not None else torch.tensor(1.0)
        if torch.rand((), generator=generator) < torch.clamp(p / q, max=1.0):
            kept.append(token)
            continue
        residual = probs[i] - (draft_probs[i] if draft_probs is not None else 0)
        residual = residual.clamp(min=0)
        residual = residual / residual.sum() if residual.sum() > 0 else probs[i]
        kept.append(torch.multinomial(residual, 1, generator=generator)[0])
        return torch.stack(kept)
    kept.append(torch.multinomial(probs[len(draft)], 1, generator=generator)[0])
    return torch.stack(kept)
