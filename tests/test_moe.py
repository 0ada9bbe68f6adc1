"""Mixtures of experts: routing, experts that only run on their tokens, router logits and the
load-balancing loss against transformers, and the spec constructs that describe them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from specformer.dsl.errors import SpecError
from specformer.generated.mixtral import MixtralForCausalLM
from specformer.runtime.moe import Experts, Router


def small_mixtral(tmp_path: Path, **overrides: object) -> tuple[MixtralForCausalLM, torch.nn.Module]:
    """A transformers Mixtral saved as transformers saves it (experts one by one, `block_sparse_moe`),
    and ours loaded from that folder."""
    torch.manual_seed(0)
    values = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                  router_aux_loss_coef=0.1) | overrides  # fmt: skip
    reference = transformers.MixtralForCausalLM(transformers.MixtralConfig(**values)).eval()
    reference.save_pretrained(tmp_path)
    return MixtralForCausalLM.from_pretrained(tmp_path).eval(), reference


@pytest.mark.parametrize("padded", [False, True])
def test_router_logits_and_load_balancing_loss_match_transformers(padded: bool, tmp_path: Path) -> None:
    ours, reference = small_mixtral(tmp_path)
    ids = torch.randint(1, 64, (2, 12))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
    keep = mask.reshape(-1).bool()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, labels=ids, output_router_logits=True)
        b = reference(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    assert len(a.router_logits) == len(b.router_logits) == 2
    for x, y in zip(a.router_logits, b.router_logits, strict=True):
        torch.testing.assert_close(x[keep], y[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(a.aux_loss, b.aux_loss, atol=1e-5, rtol=0)  # padding left out of both
    if not padded:  # (padded positions' logits are not compared anywhere: they predict nothing)
        torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=0)  # cross-entropy + 0.1 * aux_loss
    with torch.no_grad():
        plain = ours(ids, attention_mask=mask)
    assert plain.router_logits is None and plain.aux_loss is None


def test_config_output_router_logits_adds_the_loss_when_training(tmp_path: Path) -> None:
    ours, reference = small_mixtral(tmp_path, output_router_logits=True)
    ids = torch.randint(1, 64, (2, 10))
    ours.train(), reference.train()
    a, b = ours(ids, labels=ids), reference(ids, labels=ids)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=0)
    a.loss.backward()
    assert ours.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0  # the router learns from aux_loss


def test_experts_read_only_the_chosen_experts() -> None:
    """Experts no token chose are never multiplied: NaN weights there leave the output finite."""
    torch.manual_seed(0)
    experts = Experts(6, 16, 24)
    experts.init_weights(0.1)
    x = torch.randn(5, 16)
    chosen = torch.tensor([[0, 2], [2, 0], [0, 2], [2, 0], [0, 2]])
    weights = torch.rand(5, 2)
    expected = experts(x, chosen, weights)
    with torch.no_grad():
        for unused in (1, 3, 4, 5):
            experts.gate_up_proj[unused] = float("nan")
            experts.down_proj[unused] = float("nan")
    torch.testing.assert_close(experts(x, chosen, weights), expected, atol=0, rtol=0)
    # one expert by hand: down(silu(gate x) * up x), weighted, summed over a token's two choices
    gate, up = (x @ experts.gate_up_proj[0].T).chunk(2, -1)
    zero = (torch.nn.functional.silu(gate) * up) @ experts.down_proj[0].T
    gate, up = (x @ experts.gate_up_proj[2].T).chunk(2, -1)
    two = (torch.nn.functional.silu(gate) * up) @ experts.down_proj[2].T
    by_hand = (
        torch.where(chosen[:, :1] == 0, weights[:, :1], weights[:, 1:]) * zero
        + torch.where(chosen[:, :1] == 2, weights[:, :1], weights[:, 1:]) * two
    )
    torch.testing.assert_close(expected, by_hand, atol=1e-6, rtol=1e-5)


def test_router_keeps_the_top_k_and_normalizes() -> None:
    router = Router(4, 5, top_k=2, normalize=True)
    with torch.no_grad():
        router.weight.copy_(torch.eye(5, 4))
    weights, chosen = router(torch.tensor([[0.0, 3.0, 1.0, 2.0]]))
    assert chosen.tolist() == [[1, 3]]
    torch.testing.assert_close(weights.sum(-1), torch.ones(1))
    probs = torch.tensor([0.0, 3.0, 1.0, 2.0, 0.0]).softmax(-1)
    torch.testing.assert_close(weights, (probs[[1, 3]] / probs[[1, 3]].sum())[None])


def assert_delta_fails(line: str, message: str) -> None:
    """A one-line delta of Llama fails with `message`, pointing at its line."""
    from specformer.dsl.loader import SpecSet

    specs = SpecSet()
    specs.add_text((Path(__file__).parents[1] / "specs" / "llama.sf").read_text(), "llama.sf")
    with pytest.raises(SpecError, match=message) as error:
        specs.add_text(f"model Delta extends Llama {{\n  {line}\n}}\n", "delta.sf")
        specs.resolved("Delta")
    assert "delta.sf:2:" in str(error.value)


def test_stored_names_are_checked() -> None:
    for line, message in (
        ('stored DecoderLayr.mlp as "moe"', r"unknown block `DecoderLayr`; did you mean `DecoderLayer`"),
        ('stored DecoderLayer.ml as "moe"', r"`DecoderLayer` has no submodule `ml`; did you mean `mlp`"),
        ('stored DecoderLayer.mlp as "self_attn"', r"`DecoderLayer` already has a submodule `self_attn`"),
        ('stored DecoderLayer.mlp as "1moe"', r'stored name "1moe" is not an identifier'),
    ):
        assert_delta_fails(line, message)


def test_module_choices_are_checked() -> None:
    for line, message in (
        (
            "DecoderLayer.mlp = MLP if layer_idx in [0] else Router(hidden_size, 4, top_k = 2)",
            r"`MLP` and `Router` are called differently \(\(1, 1\) vs \(1, 2\) tensors in, out\)",
        ),
        (
            "DecoderLayer.mlp = MLP if layer_idx > 0 else repeat(2, MLP)",
            r"`if \.\.\. else` chooses between two blocks",
        ),
        ("DecoderLayer.mlp = MLP if layer_idx > 0 else MLPs", r"unknown block `MLPs`; did you mean `MLP`"),
    ):
        assert_delta_fails(line, message)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_greedy_and_beam_tokens_match_transformers(arch: str, tmp_path: Path) -> None:
    from reference import ARCHS, hf_config

    from specformer.runtime.generation import generate

    family = ARCHS[arch]
    torch.manual_seed(3)
    values = dict(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, pad_token_id=0)  # fmt: skip
    values |= {"num_local_experts": 4} if arch == "mixtral" else {"num_experts": 4, "moe_intermediate_size": 24,
                                                                  "shared_expert_intermediate_size": 16,
                                                                  "mlp_only_layers": [1]}  # fmt: skip
    reference = family.hf_class("ForCausalLM")(hf_config(family, values)).eval()
    reference.save_pretrained(tmp_path)
    ours = family.ours_class("ForCausalLM").from_pretrained(tmp_path).eval()
    prompt = torch.tensor([[0, 0, 5, 17, 42], [3, 9, 27, 81, 4]])
    mask = (prompt != 0).long()
    for settings in ({"max_new_tokens": 10}, {"max_new_tokens": 8, "num_beams": 3}):
        expected = reference.generate(
            prompt, attention_mask=mask, do_sample=False, pad_token_id=0, **settings
        )
        assert generate(ours, prompt, mask, **settings).tolist() == expected.tolist(), settings
