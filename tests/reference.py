"""Hugging Face Transformers as the oracle: each architecture's reference classes and small configs.

Only tests import this module; specformer itself never imports transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import transformers
from hypothesis import strategies as st

import specformer.generated.gemma as sf_gemma
import specformer.generated.llama as sf_llama


@dataclass(frozen=True)
class Arch:
    name: str
    hf_config: type
    hf_heads: dict[str, type]  # task -> HF class
    ours: Any  # the generated package
    prefix: str

    def ours_class(self, task: str) -> type:
        return getattr(self.ours, f"{self.prefix}{task}")

    def ours_config(self) -> type:
        return getattr(self.ours, f"{self.prefix}Config")


LLAMA = Arch(
    "llama",
    transformers.LlamaConfig,
    {
        "Model": transformers.LlamaModel,
        "ForCausalLM": transformers.LlamaForCausalLM,
        "ForSequenceClassification": transformers.LlamaForSequenceClassification,
    },
    sf_llama,
    "Llama",
)
GEMMA = Arch(
    "gemma",
    transformers.GemmaConfig,
    {
        "Model": transformers.GemmaModel,
        "ForCausalLM": transformers.GemmaForCausalLM,
        "ForSequenceClassification": transformers.GemmaForSequenceClassification,
    },
    sf_gemma,
    "Gemma",
)
ARCHS = {a.name: a for a in (LLAMA, GEMMA)}


@st.composite
def rope_parameters(draw: st.DrawFn, max_position_embeddings: int) -> dict[str, Any]:
    rope_type = draw(st.sampled_from(["default", "linear", "dynamic", "yarn", "longrope", "llama3"]))
    theta = draw(st.sampled_from([10000.0, 500000.0]))
    params: dict[str, Any] = {"rope_type": rope_type, "rope_theta": theta}
    original = max_position_embeddings // 4
    if rope_type in ("linear", "dynamic"):
        params["factor"] = draw(st.sampled_from([2.0, 4.0]))
    elif rope_type == "yarn":
        params |= {"factor": 4.0, "original_max_position_embeddings": original}
        if draw(st.booleans()):
            params |= {"beta_fast": 16.0, "beta_slow": 2.0}
    elif rope_type == "llama3":
        params |= {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": original,
        }
    elif rope_type == "longrope":
        params["original_max_position_embeddings"] = original
        params["_longrope_dims"] = True  # filled in once head_dim is known
    return params


@st.composite
def small_configs(draw: st.DrawFn, arch: Arch) -> dict[str, Any]:
    """Small but varied decoder configs: GQA/MQA, explicit head_dim, biases, rope variants, tying."""
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([8, 16]))
    hidden = draw(st.sampled_from([32, 48, 64]))
    max_pos = 32
    config: dict[str, Any] = {
        "vocab_size": 97,
        "hidden_size": hidden,
        "intermediate_size": draw(st.sampled_from([40, 64])),
        "num_hidden_layers": draw(st.integers(1, 3)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": draw(st.sampled_from([1e-6, 1e-5])),
        "attention_bias": draw(st.booleans()),
        "tie_word_embeddings": draw(st.booleans()),
        "pad_token_id": 0,
        "num_labels": draw(st.sampled_from([1, 3])),
        "hidden_act": draw(st.sampled_from(["silu", "gelu_pytorch_tanh", "gelu"])),
    }
    if arch is LLAMA:
        config["mlp_bias"] = draw(st.booleans())
    rope = draw(rope_parameters(max_pos))
    if rope.pop("_longrope_dims", False):
        n = head_dim // 2
        rope["long_factor"] = [1.0 + i / n for i in range(n)]
        rope["short_factor"] = [1.0 + i / (2 * n) for i in range(n)]
    config["rope_parameters"] = rope
    return config


def hf_config(arch: Arch, values: dict[str, Any]) -> Any:
    values = dict(values)
    num_labels = values.pop("num_labels", 2)
    config = arch.hf_config(**values)
    config.num_labels = num_labels
    return config
