"""The fused causal-LM training loss: the unfused loss's value and gradients, without building the logits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from specformer.runtime import losses
from specformer.runtime.losses import IGNORE_INDEX, causal_lm_loss, linear_cross_entropy


def _both(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, items: int | None) -> tuple:
    """(loss, gradients) of the fused and the unfused loss on copies of the same leaves."""
    results = []
    for fused in (True, False):
        h = hidden.detach().clone().requires_grad_()
        head.zero_grad()
        if fused:
            loss = linear_cross_entropy(h, head, labels, items)
        else:
            loss = causal_lm_loss(head(h), labels, items)
        loss.backward()
        grads = [h.grad] + [p.grad for p in head.parameters() if p.requires_grad]
        results.append((loss.detach(), [g.clone() for g in grads]))
    return results


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 9),
    vocab=st.integers(2, 40),
    bias=st.booleans(),
    ignored=st.floats(0.0, 0.9),
    chunk_rows=st.integers(1, 8),
    counted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_loss_matches_the_unfused_one(
    batch: int, length: int, vocab: int, bias: bool, ignored: float, chunk_rows: int, counted: bool, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(8, vocab, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, 8, generator=generator))
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=generator))
    hidden = torch.randn(batch, length, 8, generator=generator) * 3
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[torch.rand(batch, length, generator=generator) < ignored] = IGNORE_INDEX
    kept = int((labels[:, 1:] != IGNORE_INDEX).sum())  # position t predicts label t + 1
    items = kept + 3 if counted else None  # a larger window's count, as under gradient accumulation
    original = losses.CHUNK_ELEMENTS
    losses.CHUNK_ELEMENTS = chunk_rows * vocab  # several chunks, the last one short
    try:
        (fused, fused_grads), (plain, plain_grads) = _both(head, hidden, labels, items)
    finally:
        losses.CHUNK_ELEMENTS = original
    # nothing to predict (one position, or every label ignored): both give a NaN mean, or a zero sum
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5, equal_nan=True)
    for got, want in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, equal_nan=True)


def test_a_frozen_head_gets_no_gradient_and_the_input_still_does() -> None:
    head = nn.Linear(8, 16)
    head.requires_grad_(False)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.randint(0, 16, (2, 5))
    linear_cross_entropy(hidden, head, labels).backward()
    expected = hidden.grad.clone()
    hidden.grad = None
    causal_lm_loss(head(hidden), labels).backward()
    assert head.weight.grad is None and head.bias.grad is None
    torch.testing.assert_close(expected, hidden.grad, atol=1e-6, rtol=1e-5)


def test_heads_it_cannot_fuse_take_the_plain_path() -> None:
    """A subclass of Linear (LoRA and quantized layers are such wrappers) is called as a module."""

    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    head = Scaled(8, 16)
    hidden, labels = torch.randn(1, 4, 8, requires_grad=True), torch.randint(0, 16, (1, 4))
    torch.testing.assert_close(
        linear_cross_entropy(hidden, head, labels), causal_lm_loss(head(hidden), labels)
    )
    with torch.no_grad():  # nothing to differentiate: the plain path, no gradients computed up front
        torch.testing.assert_close(
            linear_cross_entropy(hidden, head, labels), causal_lm_loss(head(hidden), labels)
        )


def test_the_fused_loss_is_differentiated_once() -> None:
    head = nn.Linear(8, 16)
    loss = linear_cross_entropy(torch.randn(1, 4, 8, requires_grad=True), head, torch.randint(0, 16, (1, 4)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="differentiated once"):
        loss.backward()


def test_a_training_step_gives_the_eval_loss_and_gradients_without_logits() -> None:
    """The generated causal LM in training mode with labels: no logits, the same loss and gradients."""
    from specformer.generated.llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 97, (2, 7))
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX

    model.train()
    out = model(ids, labels=labels, num_items_in_batch=9)
    assert out.logits is None
    out.loss.backward()
    fused = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    model.eval()  # no dropout in this config, so eval computes the same function, unfused
    reference = model(ids, labels=labels, num_items_in_batch=9)
    assert reference.logits is not None
    reference.loss.backward()
    torch.testing.assert_close(out.loss, reference.loss)
    for got, (name, p) in zip(fused, model.named_parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_bfloat16_weights_give_the_unfused_loss_within_bfloat16_precision() -> None:
    """A bf16 model (no autocast): logits are made in bf16 and the loss in float32, as the unfused path."""
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False).to(torch.bfloat16)
    hidden = torch.randn(2, 6, 16, dtype=torch.bfloat16)
    labels = torch.randint(0, 50, (2, 6))
    (fused, fused_grads), (plain, plain_grads) = _both(head, hidden, labels, None)
    assert fused_grads[0].dtype == torch.bfloat16
    torch.testing.assert_close(fused, plain, atol=1e-3, rtol=1e-3)
    for got, want in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-2)


def test_a_head_that_does_more_than_project_keeps_the_plain_loss(tmp_path) -> None:
    """Only a head whose forward is exactly `return proj(h)` gets the fused branch: a scaled head is
    generated with the plain loss, and in training it still returns logits and the same loss."""
    from specformer.runtime.auto import AutoModelForCausalLM

    spec = tmp_path / "scaled.sf"
    spec.write_text(
        'model Scaled extends Llama {\n  model_type = "scaled"\n'
        "  ForCausalLM.forward(h) { return lm_head(h) * 0.5 }\n}\n"
    )
    config = {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip
    model = AutoModelForCausalLM.from_spec(spec, config)
    from specformer.generated.llama import LlamaForCausalLM

    assert "linear_cross_entropy" in LlamaForCausalLM.forward.__code__.co_names
    source = type(model).forward.__code__.co_names
    assert "linear_cross_entropy" not in source and "causal_lm_loss" in source
    ids = torch.randint(0, 40, (2, 5))
    out = model.train()(ids, labels=ids)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, causal_lm_loss(out.logits, ids))
