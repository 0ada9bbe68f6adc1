"""Weights copied into huge pages (runtime/huge_pages.py): the same model, ties and shared storages kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from specformer.generated.llama import LlamaConfig, LlamaForCausalLM
from specformer.runtime import huge_pages
from specformer.runtime.huge_pages import gather_into_huge_pages, place_in_huge_pages, weight_bytes
from specformer.runtime.quantization import WeightOnlyConfig, quantize

needs_huge_pages = pytest.mark.skipif(
    not huge_pages.huge_pages_available(), reason="no transparent huge pages on this system"
)


def small_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def storages(module: nn.Module) -> set[int]:
    tensors = [*module.parameters(), *module.buffers()]
    return {t.untyped_storage().data_ptr() for t in tensors}


@needs_huge_pages
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_a_gathered_model_computes_the_same_from_one_mapping(bits: int | None) -> None:
    model = small_llama()
    if bits is not None:
        quantize(model, WeightOnlyConfig(bits=bits))
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    parameters = dict(model.named_parameters())
    size = weight_bytes(model)
    assert gather_into_huge_pages(model) >= size
    assert len(storages(model)) == 1  # every parameter and buffer in the one mapping
    assert dict(model.named_parameters()) == parameters  # the same Parameter objects, so ties hold
    if bits is None:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)


@needs_huge_pages
def test_views_of_one_storage_stay_views_of_one_storage() -> None:
    """Tensors that share memory (a stack and its slices, as packed expert stacks are) are copied once and
    keep their offsets, dtypes, strides and requires_grad."""
    module = nn.Module()
    stack = torch.arange(96, dtype=torch.float32)
    module.register_buffer("first", stack[:32].view(4, 8))
    module.register_buffer("strided", stack[32:].view(8, 8).t())
    module.register_buffer("as_bytes", stack[:16].view(torch.uint8))
    module.weight = nn.Parameter(torch.randn(5, 3))
    before = {name: t.clone() for name, t in module.state_dict().items()}
    gather_into_huge_pages(module)
    assert len(storages(module)) == 1
    assert module.strided.stride() == (1, 8) and module.weight.requires_grad
    assert module.strided.data_ptr() == module.first.data_ptr() + 32 * 4
    assert module.as_bytes.data_ptr() == module.first.data_ptr()
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    module.first[0, 0] = 7.0  # one memory: a write through one view shows through the others
    assert module.as_bytes.view(torch.float32)[0] == 7.0
    (module.weight.sum() * 2).backward()  # gradients still flow to the Parameter
    assert torch.equal(module.weight.grad, torch.full((5, 3), 2.0))


@needs_huge_pages
def test_a_gathered_model_saves_and_reloads(tmp_path: Path) -> None:
    model = small_llama()
    gather_into_huge_pages(model)
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path, huge_pages=False)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_small_models_and_refusals_stay_where_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    model = small_llama()
    before = storages(model)
    assert weight_bytes(model) < huge_pages.WORTH_IT
    assert place_in_huge_pages(model, None) == 0  # too small to gain: a 2 MB page would hold little
    assert place_in_huge_pages(model, False) == 0
    monkeypatch.setattr(huge_pages, "WORTH_IT", 0)
    monkeypatch.setattr(huge_pages, "available_memory", lambda: weight_bytes(model))  # no room for a copy
    assert place_in_huge_pages(model, None) == 0
    assert storages(model) == before
    monkeypatch.setattr(huge_pages, "huge_pages_available", lambda: False)  # another OS, or THP off
    assert gather_into_huge_pages(model) == 0
    assert storages(model) == before


@needs_huge_pages
def test_loading_places_large_models_in_huge_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small_llama().save_pretrained(tmp_path)
    monkeypatch.setattr(huge_pages, "WORTH_IT", 0)  # as a model of 16 MB or more is placed
    placed = LlamaForCausalLM.from_pretrained(tmp_path)
    assert len(storages(placed)) == 1
    kept = LlamaForCausalLM.from_pretrained(tmp_path, huge_pages=False)
    assert len(storages(kept)) > 1


@needs_huge_pages
def test_tensor_subclasses_are_left_alone() -> None:
    """A wrapper subclass (as tensor parallelism's DTensor is) has no storage of its own to move."""

    class Wrapped(torch.Tensor):
        pass

    module = nn.Module()
    module.plain = nn.Parameter(torch.randn(3))
    module.wrapped = nn.Parameter(torch.randn(3).as_subclass(Wrapped))
    before = module.wrapped.data_ptr()
    assert gather_into_huge_pages(module) > 0
    assert module.wrapped.data_ptr() == before
