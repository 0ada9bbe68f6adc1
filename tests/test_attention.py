"""Masks and backends: lower-right causal alignment after a cache, windows, padding, GQA."""

from __future__ import annotations

import itertools

import pytest
import torch

from specformer.runtime.attention import AttentionMask, attend


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), masked) v, straight from the definition."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def test_mask_geometry() -> None:
    mask = AttentionMask(None, q_len=2, past=3)
    allowed = mask.allowed(causal=True, window=None, device=torch.device("cpu"))[0, 0]
    assert allowed.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    windowed = mask.allowed(causal=True, window=2, device=torch.device("cpu"))[0, 0]
    assert windowed.tolist() == [[False, False, True, True, False], [False, False, False, True, True]]


@pytest.mark.parametrize(
    ("past", "q_len", "window", "padded", "causal"),
    list(itertools.product([0, 3], [1, 4], [None, 2], [False, True], [True, False])),
)
def test_backends_agree_with_the_definition(
    past: int, q_len: int, window: int | None, padded: bool, causal: bool
) -> None:
    kv_len = past + q_len
    q = torch.randn(2, 4, q_len, 8)
    k, v = torch.randn(2, 2, kv_len, 8), torch.randn(2, 2, kv_len, 8)
    padding = torch.ones(2, kv_len, dtype=torch.long)
    if padded:
        padding[0, :1] = 0  # left padding that every query in row 0 can skip
    mask = AttentionMask(padding, q_len, past)
    allowed = mask.allowed(causal, window, q.device)
    expected = reference(
        q, k, v, allowed if allowed is not None else torch.ones(1, 1, q_len, kv_len, dtype=torch.bool)
    )
    for impl in ("sdpa", "eager"):
        out = attend(q, k, v, mask, causal=causal, window=window, impl=impl)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
