"""Reference classes and small configs for the encoder family (BERT, DistilBERT, DPR)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from hypothesis import strategies as st

import specformer.generated.bert as sf_bert
import specformer.generated.distilbert as sf_distilbert
import specformer.generated.dpr as sf_dpr
import specformer.generated.modernbert as sf_modernbert

# Output tensors each head returns, by name.
OUTPUTS = {
    "Model": ("last_hidden_state",),
    "ForQuestionAnswering": ("start_logits", "end_logits"),
    "QuestionEncoder": ("pooler_output",),
    "ContextEncoder": ("pooler_output",),
    "Reader": ("start_logits", "end_logits", "relevance_logits"),
}


@dataclass(frozen=True)
class EncoderArch:
    name: str
    hf_prefix: str
    ours: Any
    heads: tuple[str, ...]
    config: Callable[[st.DrawFn], dict[str, Any]]
    token_types: bool

    def hf_class(self, head: str) -> type:
        return getattr(transformers, f"{self.hf_prefix}{head}")

    def ours_class(self, head: str) -> type:
        return getattr(self.ours, f"{self.hf_prefix}{head}")

    def hf_config(self, values: dict[str, Any]) -> Any:
        values = dict(values)
        num_labels = values.pop("num_labels", 2)
        config = getattr(transformers, f"{self.hf_prefix}Config")(**values)
        config.num_labels = num_labels
        return config


def _bert_like(draw: st.DrawFn) -> dict[str, Any]:
    heads = draw(st.sampled_from([1, 2, 4]))
    return {
        "vocab_size": 61,
        "hidden_size": heads * draw(st.sampled_from([8, 16])),
        "num_hidden_layers": draw(st.integers(1, 3)),
        "num_attention_heads": heads,
        "intermediate_size": draw(st.sampled_from([24, 48])),
        "hidden_act": draw(st.sampled_from(["gelu", "relu", "gelu_new"])),
        "max_position_embeddings": 32,
        "type_vocab_size": draw(st.sampled_from([1, 2])),
        "layer_norm_eps": draw(st.sampled_from([1e-12, 1e-5])),
    }


def _bert(draw: st.DrawFn) -> dict[str, Any]:
    return _bert_like(draw) | {"classifier_dropout": draw(st.sampled_from([None, 0.3]))}


def _dpr(draw: st.DrawFn) -> dict[str, Any]:
    return _bert_like(draw) | {"projection_dim": draw(st.sampled_from([0, 8]))}


def _distilbert(draw: st.DrawFn) -> dict[str, Any]:
    heads = draw(st.sampled_from([1, 2, 4]))
    return {
        "vocab_size": 61,
        "dim": heads * draw(st.sampled_from([8, 16])),
        "n_layers": draw(st.integers(1, 3)),
        "n_heads": heads,
        "hidden_dim": draw(st.sampled_from([24, 48])),
        "activation": draw(st.sampled_from(["gelu", "relu"])),
        "max_position_embeddings": 32,
        "sinusoidal_pos_embds": draw(st.booleans()),
    }


def _modernbert(draw: st.DrawFn) -> dict[str, Any]:
    heads = draw(st.sampled_from([1, 2, 4]))
    layers = draw(st.integers(1, 3))
    return {
        "vocab_size": 61,
        "hidden_size": heads * 16,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": draw(st.sampled_from([24, 48])),
        "hidden_activation": draw(st.sampled_from(["gelu", "silu"])),
        "max_position_embeddings": 32,
        "pad_token_id": 0,
        "norm_bias": draw(st.booleans()),
        "attention_bias": draw(st.booleans()),
        "mlp_bias": draw(st.booleans()),
        "classifier_bias": draw(st.booleans()),
        "decoder_bias": draw(st.booleans()),
        "local_attention": draw(st.sampled_from([4, 6])),  # a window narrower than the sequences
        "layer_types": draw(
            st.lists(
                st.sampled_from(["sliding_attention", "full_attention"]), min_size=layers, max_size=layers
            )
        ),
        "classifier_pooling": draw(st.sampled_from(["cls", "mean"])),
        "rope_parameters": {
            "full_attention": {
                "rope_type": "default",
                "rope_theta": draw(st.sampled_from([160000.0, 1000.0])),
            },
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    }


ENCODERS = {
    a.name: a
    for a in (
        EncoderArch(
            "bert",
            "Bert",
            sf_bert,
            (
                "Model",
                "ForSequenceClassification",
                "ForTokenClassification",
                "ForQuestionAnswering",
                "ForMultipleChoice",
            ),
            _bert,
            True,
        ),
        EncoderArch(
            "distilbert",
            "DistilBert",
            sf_distilbert,
            (
                "Model",
                "ForMaskedLM",
                "ForSequenceClassification",
                "ForTokenClassification",
                "ForQuestionAnswering",
                "ForMultipleChoice",
            ),
            _distilbert,
            False,
        ),
        EncoderArch("dpr", "DPR", sf_dpr, ("QuestionEncoder", "ContextEncoder", "Reader"), _dpr, True),
        EncoderArch(
            "modernbert",
            "ModernBert",
            sf_modernbert,
            (
                "Model",
                "ForMaskedLM",
                "ForSequenceClassification",
                "ForTokenClassification",
                "ForQuestionAnswering",
                "ForMultipleChoice",
            ),
            _modernbert,
            False,
        ),
    )
}


def inputs(
    arch: EncoderArch, head: str, config: dict[str, Any], seed: int, length: int
) -> dict[str, torch.Tensor]:
    """A right-padded batch (as BERT tokenizers pad), with token types where the model has them."""
    generator = torch.Generator().manual_seed(seed)
    shape = (2, 3, length) if head == "ForMultipleChoice" else (3, length)
    ids = torch.randint(1, config["vocab_size"], shape, generator=generator)
    mask = torch.ones_like(ids)
    mask[..., 1, length - 3 :] = 0
    ids[mask == 0] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if arch.token_types and head != "Reader":  # HF's DPRReader takes no token types
        batch["token_type_ids"] = torch.randint(
            0, config.get("type_vocab_size", 2), shape, generator=generator
        )
    return batch
