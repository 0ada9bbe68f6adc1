"""An additive score bias in `attend` (`bias = ...`), here ALiBi's distance penalties: the same numbers on
every backend that can add one, the slopes and geometry transformers' Bloom uses, correct after cached
positions, and a load-time refusal from a backend that cannot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from specformer.runtime import AutoModelForCausalLM
from specformer.runtime.attention import AttentionMask, alibi_bias, alibi_slopes, missing_features
from specformer.runtime.cache import DynamicCache

ALIBI = """
# A Llama with ALiBi in place of rotary positions: distance penalties added to the attention scores.
model AlibiLM extends Llama {
  model_type = "alibi_lm"
  Attention.forward(x) {
    q = split_heads(q_proj(x), head_dim)
    k = split_heads(k_proj(x), head_dim)
    v = split_heads(v_proj(x), head_dim)
    y = attend(q, k, v, causal = true, bias = alibi(num_attention_heads))
    return o_proj(merge_heads(y))
  }
  remove Model.rotary_emb
}
"""
CONFIG = {"vocab_size": 61, "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 6, "num_key_value_heads": 3}  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("alibi") / "alibi.sf"
    path.write_text(ALIBI)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_spec(path, CONFIG).eval()


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 6, 8, 12, 16, 20])
def test_slopes_are_bloom_s(heads: int) -> None:
    reference = build_alibi_tensor(torch.ones(1, 3), heads, torch.float32)  # (H, 1, S): slope * key position
    torch.testing.assert_close(alibi_slopes(heads), reference[:, 0, 1], atol=0, rtol=0)


def test_the_bias_differs_from_bloom_s_only_by_a_constant_per_query() -> None:
    """Bloom adds slope * key position; softmax ignores a constant per query row, so -slope * |i - j| is
    the same attention over the past keys (and also defined for encoders, which see both sides)."""
    heads, length = 6, 7
    ours = alibi_bias(heads, AttentionMask(None, length))[0]  # (H, T, S)
    bloom = build_alibi_tensor(torch.ones(1, length), heads, torch.float32)  # (H, 1, S)
    difference = (ours - bloom).tril()  # the keys a causal query sees
    for row in range(length):
        seen = difference[:, row, : row + 1]
        torch.testing.assert_close(seen, seen[:, :1].expand_as(seen))


def test_backends_agree_with_left_padding(model) -> None:
    ids = torch.randint(1, 61, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        eager = model.set_attention("eager")(ids, attention_mask=mask).logits
        for backend in ("sdpa", "flex_attention"):
            other = model.set_attention(backend)(ids, attention_mask=mask).logits
            torch.testing.assert_close(other[mask.bool()], eager[mask.bool()], atol=1e-5, rtol=0)
    model.set_attention("sdpa")


def test_cached_decoding_counts_distances_from_the_cached_positions(model) -> None:
    ids = torch.randint(1, 61, (1, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache()
        model(ids[:, :7], past_key_values=cache, use_cache=True)
        steps = [model(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(7, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 7:], atol=1e-5, rtol=0)


def test_a_backend_that_cannot_add_a_bias_is_refused(model) -> None:
    assert model.attention_features == frozenset({"score_bias"})
    assert missing_features("flash_attention_2", model.attention_features) == {"score_bias"}
    with pytest.raises(ValueError, match="score_bias"):
        model.set_attention("flash_attention_2")


def test_the_bias_keyword_takes_a_tensor(tmp_path: Path) -> None:
    from specformer.dsl import SpecError

    (tmp_path / "bad.sf").write_text(ALIBI.replace("bias = alibi(num_attention_heads)", "bias = head_dim"))
    with pytest.raises(SpecError, match=r"bad\.sf:9:47: error: `head_dim` is a config value, not a tensor"):
        AutoModelForCausalLM.from_spec(tmp_path / "bad.sf", CONFIG)


def test_every_layer_adds_the_bias(model, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    generated = sys.modules[type(model).__module__]
    seen = []

    def recording(q, k, v, mask, **options):
        seen.append(options.get("bias"))
        return generated_attend(q, k, v, mask, **options)

    generated_attend = generated.attend
    monkeypatch.setattr(generated, "attend", recording)
    with torch.no_grad():
        model(torch.randint(1, 61, (1, 5)))
    assert len(seen) == CONFIG["num_hidden_layers"]
    for bias in seen:
        torch.testing.assert_close(bias, alibi_bias(6, AttentionMask(None, 5)), atol=0, rtol=0)
