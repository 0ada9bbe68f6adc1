"""Auto classes pick the generated class from config.json's `model_type`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from specformer.runtime import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from specformer.runtime.checkpoint import CheckpointError

DECODER = {"vocab_size": 40, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1}
DECODER |= {"num_attention_heads": 4, "num_key_value_heads": 2}
ENCODER = {"vocab_size": 40, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1}
ENCODER |= {"num_attention_heads": 4, "max_position_embeddings": 16}
DISTIL = {
    "vocab_size": 40,
    "dim": 32,
    "hidden_dim": 48,
    "n_layers": 1,
    "n_heads": 4,
    "max_position_embeddings": 16,
}

CASES = [
    ("Llama", DECODER, AutoModelForCausalLM, "ForCausalLM"),
    ("Mistral", DECODER, AutoModelForSequenceClassification, "ForSequenceClassification"),
    ("Qwen2", DECODER, AutoModelForQuestionAnswering, "ForQuestionAnswering"),
    ("Gemma", DECODER, AutoModel, "Model"),
    ("Bert", ENCODER, AutoModelForTokenClassification, "ForTokenClassification"),
    ("DistilBert", DISTIL, AutoModelForMaskedLM, "ForMaskedLM"),
    ("DistilBert", DISTIL, AutoModelForMultipleChoice, "ForMultipleChoice"),
]


@pytest.mark.parametrize(("prefix", "values", "auto", "head"), CASES, ids=[f"{c[0]}{c[3]}" for c in CASES])
def test_auto_classes_load_the_matching_generated_class(prefix, values, auto, head, tmp_path: Path) -> None:
    config = getattr(transformers, f"{prefix}Config")(**values)
    reference = getattr(transformers, f"{prefix}{head}")(config).eval()
    reference.save_pretrained(tmp_path)
    model = auto.from_pretrained(tmp_path)
    assert type(model).__name__ == f"{prefix}{head}"
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == f"{prefix}Config"
    ids = torch.randint(1, 40, (1, 2, 6) if head == "ForMultipleChoice" else (1, 6))
    with torch.no_grad():
        expected, actual = reference(ids), model(ids)
    name = "last_hidden_state" if head == "Model" else "start_logits" if "Question" in head else "logits"
    torch.testing.assert_close(getattr(actual, name), getattr(expected, name), atol=1e-5, rtol=0)


def test_unknown_model_type_lists_the_known_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt9"}))
    with pytest.raises(
        ValueError,
        match=r"unknown model_type `gpt9`; known: bert, distilbert, dpr, gemma, .*llama, mistral",
    ):
        AutoModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(CheckpointError, match="no `model_type`"):
        AutoConfig.from_pretrained(tmp_path)


def test_missing_head_is_named() -> None:
    with pytest.raises(ValueError, match="`bert` has no ForCausalLM class; it has: ForMultipleChoice"):
        AutoModelForCausalLM.from_config(AutoConfig.for_model("bert"))
    with pytest.raises(TypeError, match="is a factory"):
        AutoModel()


def test_auto_finds_a_causal_lm_named_the_older_way(tmp_path) -> None:
    """transformers calls GPT-2's causal LM `GPT2LMHeadModel`; AutoModelForCausalLM finds it."""
    from specformer.generated.gpt2 import GPT2Config, GPT2LMHeadModel
    from specformer.runtime.auto import AutoModelForCausalLM

    GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is GPT2LMHeadModel
