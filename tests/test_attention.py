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
    for impl in ("sdpa", "eager", "flex_attention", "specformer_cpu"):
        with torch.no_grad():  # inference: where the CPU kernel takes one-query steps
            out = attend(
                q, k, v, AttentionMask(padding, q_len, past, backend=impl), causal=causal, window=window
            )
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


WINDOWED = {
    "llama": {},
    "mistral": {"sliding_window": 4},  # shorter than the prompt: the window really cuts
    "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
}


@pytest.mark.parametrize("name", sorted(WINDOWED))
def test_backends_agree_on_models(name: str) -> None:
    """Every backend available on the CPU gives the reference's logits and the same greedy tokens,
    on a left-padded batch, for a prefill and then decoding with the cache."""
    from reference import ARCHS

    from specformer.runtime.generation import generate

    arch = ARCHS[name]
    config_class = arch.ours_class("ForCausalLM").config_class
    config = config_class(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **WINDOWED[name],
    )  # fmt: skip
    torch.manual_seed(0)
    model = arch.ours_class("ForCausalLM")(config).eval()
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    results = {}
    for impl in ("eager", "sdpa", "flex_attention"):
        model.set_attention(impl)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
        tokens = generate(model, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
        results[impl] = (logits[mask.bool()], tokens)
    for impl, (logits, tokens) in results.items():
        torch.testing.assert_close(logits, results["eager"][0], atol=1e-5, rtol=0, msg=impl)
        assert tokens.tolist() == results["eager"][1].tolist(), impl


def test_unusable_backends_fail_at_load_with_the_reason(tmp_path) -> None:
    from specformer.generated.llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"flash_attention_2' cannot run: .*(not installed|CUDA)"):
        LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="choose one of"):
        LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="paged")
    chosen = LlamaForCausalLM.from_pretrained(tmp_path)  # None: the best for fp32 on the CPU
    assert chosen.attn_implementation == "specformer_cpu"  # SDPA, with the CPU kernel for decode steps


def test_flash_varlen_packing_round_trips() -> None:
    """The unpad/repad helpers the flash varlen path uses, on the CPU."""
    from specformer.runtime.attention import repad, unpad

    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    keep = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    packed = unpad(x, keep)
    assert packed.rows.shape == (8, 3)
    assert packed.cu_seqlens.tolist() == [0, 3, 8] and packed.cu_seqlens.dtype == torch.int32
    assert packed.max_seqlen == 5
    torch.testing.assert_close(packed.rows, x[keep])
    back = repad(packed.rows, packed.indices, 2, 5)
    torch.testing.assert_close(back[keep], x[keep])
    assert back[~keep].abs().sum() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention-2 needs a CUDA GPU")
@pytest.mark.parametrize("window", [None, 3])
def test_flash_attention_2_matches_sdpa(window: int | None) -> None:
    pytest.importorskip("flash_attn")
    q = torch.randn(2, 4, 6, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 6, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    padding = torch.ones(2, 6, dtype=torch.long, device="cuda")
    padding[0, :2] = 0
    mask = AttentionMask(padding, 6)
    mask.backend = "flash_attention_2"
    flash = attend(q, k, v, mask, causal=True, window=window)
    mask.backend = "sdpa"
    sdpa = attend(q, k, v, mask, causal=True, window=window)
    keep = padding.bool()[:, None, :, None].expand_as(sdpa)
    torch.testing.assert_close(flash[keep], sdpa[keep], atol=2e-2, rtol=2e-2)
