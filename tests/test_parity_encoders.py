"""BERT, DistilBERT and DPR against transformers: every head, both directions, losses, config.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from encoders import ENCODERS, OUTPUTS, EncoderArch, inputs
from hypothesis import given
from hypothesis import strategies as st

ATOL = 1e-5
PARAMS = [pytest.param(arch, id=name) for name, arch in ENCODERS.items()]


def draw_case(arch: EncoderArch, data: st.DataObject) -> tuple[str, dict]:
    head = data.draw(st.sampled_from(arch.heads), label="head")
    config = data.draw(st.composite(lambda draw: arch.config(draw))(), label="config")
    if head in ("ForQuestionAnswering",):
        config["num_labels"] = 2
    elif head != "Model":
        config["num_labels"] = data.draw(st.sampled_from([1, 3]), label="num_labels")
    if head == "Reader":
        config["projection_dim"] = 0  # HF's reader sizes its heads for the projection but never applies it
    return head, config


def run(model: torch.nn.Module, head: str, batch: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**batch)
    names = OUTPUTS.get(head, ("logits",))
    return {name: getattr(out, name) for name in names}


def compare(expected: dict, actual: dict, batch: dict) -> None:
    mask = batch["attention_mask"].bool()
    for name in expected:
        want, got = expected[name], actual[name]
        if want.shape[: mask.dim()] == mask.shape:  # per-token outputs: padding positions are undefined
            want, got = want[mask], got[mask]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("arch", PARAMS)
@given(data=st.data())
def test_hf_checkpoint_loads_and_matches(arch: EncoderArch, data: st.DataObject, tmp_path_factory) -> None:
    head, config = draw_case(arch, data)
    folder = tmp_path_factory.mktemp("hf")
    reference = arch.hf_class(head)(arch.hf_config(config)).eval()
    reference.save_pretrained(folder)
    ours = arch.ours_class(head).from_pretrained(folder)
    assert set(ours.state_dict()) == set(reference.state_dict())
    batch = inputs(arch, head, config, seed=len(config), length=data.draw(st.sampled_from([7, 16])))
    expected = run(reference, head, batch)
    for impl in ("sdpa", "eager", "flex_attention"):
        ours.set_attention(impl)
        compare(expected, run(ours, head, batch), batch)


@pytest.mark.parametrize("arch", PARAMS)
@given(data=st.data())
def test_saved_checkpoint_loads_in_transformers(
    arch: EncoderArch, data: st.DataObject, tmp_path_factory
) -> None:
    head, config = draw_case(arch, data)
    hf_folder, our_folder = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("ours")
    arch.hf_class(head)(arch.hf_config(config)).save_pretrained(hf_folder)
    ours = arch.ours_class(head).from_pretrained(hf_folder)
    ours.save_pretrained(our_folder)
    reference = arch.hf_class(head).from_pretrained(our_folder).eval()
    batch = inputs(arch, head, config, seed=1, length=9)
    compare(run(reference, head, batch), run(ours, head, batch), batch)
    hf_keys = set(json.loads((hf_folder / "config.json").read_text())) - {"transformers_version"}
    assert set(json.loads((our_folder / "config.json").read_text())) == hf_keys


def test_bert_pooler_output_matches(tmp_path: Path) -> None:
    arch = ENCODERS["bert"]
    config = {"vocab_size": 61, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    config |= {"intermediate_size": 48, "max_position_embeddings": 32}
    reference = arch.hf_class("Model")(arch.hf_config(config)).eval()
    reference.save_pretrained(tmp_path)
    ours = arch.ours_class("Model").from_pretrained(tmp_path)
    batch = inputs(arch, "Model", config, seed=0, length=9)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(**batch).pooler_output, reference(**batch).pooler_output, atol=ATOL, rtol=0
        )
        assert ours(**batch).last_hidden_state.shape == (3, 9, 32)


LABELS = {
    "ForSequenceClassification": lambda n, shape: (
        torch.tensor([2, 0, 1]) if n == 3 else torch.tensor([0.5, -1.0, 2.0])
    ),
    "ForTokenClassification": lambda n, shape: torch.randint(0, n, shape),
    "ForMaskedLM": lambda n, shape: torch.where(torch.rand(shape) < 0.3, torch.randint(0, 61, shape), -100),
    "ForMultipleChoice": lambda n, shape: torch.tensor([2, 0]),
}


@pytest.mark.parametrize("arch", PARAMS)
def test_losses_match(arch: EncoderArch, tmp_path: Path) -> None:
    for i, head in enumerate(h for h in arch.heads if h in (*LABELS, "ForQuestionAnswering")):
        for num_labels in (
            (1, 3) if head == "ForSequenceClassification" else (2 if head == "ForQuestionAnswering" else 3,)
        ):
            config = data_free_config(arch) | {"num_labels": num_labels}
            reference = arch.hf_class(head)(arch.hf_config(config)).eval()
            folder = tmp_path / f"{i}-{num_labels}"
            reference.save_pretrained(folder)
            ours = arch.ours_class(head).from_pretrained(folder)
            batch = inputs(arch, head, config, seed=i, length=9)
            if head == "ForQuestionAnswering":
                targets = {
                    "start_positions": torch.tensor([1, 4, 2]),
                    "end_positions": torch.tensor([3, 30, 5]),
                }
            else:
                shape = batch["input_ids"].shape
                targets = {"labels": LABELS[head](num_labels, shape)}
            with torch.no_grad():
                expected = reference(**batch, **targets).loss
                actual = ours(**batch, **targets).loss
            torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def data_free_config(arch: EncoderArch) -> dict:
    if arch.name == "distilbert":
        return {
            "vocab_size": 61,
            "dim": 32,
            "n_layers": 2,
            "n_heads": 4,
            "hidden_dim": 48,
            "max_position_embeddings": 32,
        }
    config = {
        "vocab_size": 61,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 48,
        "max_position_embeddings": 32,
    }
    return config | ({"pad_token_id": 0} if arch.name == "modernbert" else {})  # its default is past 61
