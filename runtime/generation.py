"""Token-by-token decoding with a KV cache: greedy, or sampling with temperature and top-p."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .cache import DynamicCache


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always survives)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    on_token: Callable[[int], None] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend a single unpadded prompt (1, T); returns (1, T + new). Stops at `eos_token_id`."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected (1, prompt_length)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens is {max_new_tokens}; expected a count >= 0")
    cache = DynamicCache()
    tokens = input_ids
    step = input_ids
    for _ in range(max_new_tokens):
        past = cache.get_seq_length()
        positions = torch.arange(past, past + step.shape[1], device=step.device)[None]
        out = model(step, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
        next_token = _sample(out.logits[:, -1], temperature, top_p, generator)  # (1,)
        token = int(next_token)
        tokens = torch.cat((tokens, next_token[:, None]), dim=1)
        if on_token is not None:
            on_token(token)
        if token == eos_token_id:
            break
        step = next_token[:, None]
    return tokens
