"""Hugging Face Transformers as the oracle: each architecture's reference classes and small configs.

Only tests import this module; specformer itself never imports transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import transformers
from hypothesis import strategies as st

import specformer.generated.gemma as sf_gemma
import specformer.generated.gemma2 as sf_gemma2
import specformer.generated.gemma3_text as sf_gemma3_text
import specformer.generated.gpt2 as sf_gpt2
import specformer.generated.gpt_neox as sf_gpt_neox
import specformer.generated.llama as sf_llama
import specformer.generated.mistral as sf_mistral
import specformer.generated.mixtral as sf_mixtral
import specformer.generated.olmo2 as sf_olmo2
import specformer.generated.olmoe as sf_olmoe
import specformer.generated.phi as sf_phi
import specformer.generated.phi3 as sf_phi3
import specformer.generated.qwen2 as sf_qwen2
import specformer.generated.qwen2_moe as sf_qwen2_moe
import specformer.generated.qwen3 as sf_qwen3
import specformer.generated.qwen3_moe as sf_qwen3_moe
import specformer.generated.stablelm as sf_stablelm

DECODER_HEADS = (
    "Model",
    "ForCausalLM",
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
)


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


@dataclass(frozen=True)
class Arch:
    name: str
    hf_prefix: str  # transformers class prefix, e.g. "Llama"
    ours: Any  # the generated package
    prefix: str  # generated class prefix
    heads: tuple[str, ...]
    extra: Callable[[st.DrawFn, dict[str, Any]], dict[str, Any]]  # architecture-specific config fields
    drop: tuple[str, ...] = ()  # drawn Llama-style fields the family's config does not have
    rope_types: tuple[str, ...] = ROPE_TYPES  # the rope types the family's config accepts
    causal_lm: str = "ForCausalLM"  # the causal LM class's suffix where transformers names it otherwise
    hf_names: tuple[tuple[str, str], ...] = ()  # (head, transformers class) where the prefix differs
    rope_per_kind: bool = False  # rope parameters per layer kind (full / sliding attention)

    @property
    def hf_config(self) -> type:
        return getattr(transformers, f"{self.hf_prefix}Config")

    def hf_class(self, head: str) -> type:
        name = dict(self.hf_names).get(head, f"{self.hf_prefix}{self._suffix(head)}")
        return getattr(transformers, name)

    def ours_class(self, head: str) -> type:
        return getattr(self.ours, f"{self.prefix}{self._suffix(head)}")

    def _suffix(self, head: str) -> str:
        return self.causal_lm if head == "ForCausalLM" else head


def _llama_extra(draw: st.DrawFn, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "attention_bias": draw(st.booleans()),
        "mlp_bias": draw(st.booleans()),
        "head_dim": config["head_dim"],
    }


def _gemma_extra(draw: st.DrawFn, config: dict[str, Any]) -> dict[str, Any]:
    return {"attention_bias": draw(st.booleans()), "head_dim": config["head_dim"]}


def _mistral_extra(draw: st.DrawFn, config: dict[str, Any]) -> dict[str, Any]:
    # windows shorter than the test sequences, so the window really cuts
    return {"sliding_window": draw(st.sampled_from([None, 3, 8])), "head_dim": config["head_dim"]}


def _mixtral_extra(draw: st.DrawFn, config: dict[str, Any]) -> dict[str, Any]:
    experts = draw(st.sampled_from([1, 3, 8]))
    return _mistral_extra(draw, config) | {
        "num_local_experts": experts,
        "num_experts_per_tok": draw(st.sampled_from([k for k in (1, 2, 8) if k <= experts])),
    }


def _qwen2_extra(draw: st.DrawFn, config: dict[str, Any]) -> dict[str, Any]:
    layers = config["num_hidden_layers"]
    return {
        "use_sliding_window": draw(st.booleans()),
        "sliding_window": draw(st.sampled_from([3, 8])),
        "max_window_layers": draw(st.integers(0, layers)),
    }


def _moe_extra(draw: st.DrawFn, config: dict[str, Any]) -> dict[str, Any]:
    """Experts of their own size, top-1/2/8 with and without renormalisation, dense layers mixed in by
    list and by step."""
    layers = config["num_hidden_layers"]
    experts = draw(st.sampled_from([1, 3, 8]))
    return {
        "num_experts": experts,
        "num_experts_per_tok": draw(st.sampled_from([k for k in (1, 2, 8) if k <= experts])),
        "moe_intermediate_size": draw(st.sampled_from([16, 24])),
        "norm_topk_prob": draw(st.booleans()),
        "mlp_only_layers": draw(st.lists(st.integers(0, layers - 1), max_size=2, unique=True)),
        "decoder_sparse_step": draw(st.sampled_from([1, 2])),
    }


def _qwen2_moe_extra(draw: st.DrawFn, config: dict[str, Any]) -> dict[str, Any]:
    return (
        _qwen2_extra(draw, config)
        | _moe_extra(draw, config)
        | {
            "qkv_bias": draw(st.booleans()),
            "shared_expert_intermediate_size": draw(st.sampled_from([16, 40])),
        }
    )


def _qwen3_moe_extra(draw: st.DrawFn, config: dict[str, Any]) -> dict[str, Any]:
    return _moe_extra(draw, config) | {
        "use_sliding_window": draw(st.booleans()),
        "sliding_window": draw(st.sampled_from([3, 8])),
        "attention_bias": draw(st.booleans()),
    }


def _olmoe_extra(draw: st.DrawFn, config: dict[str, Any]) -> dict[str, Any]:
    experts = draw(st.sampled_from([1, 3, 8]))
    return {
        "attention_bias": draw(st.booleans()),
        "clip_qkv": draw(st.sampled_from([None, 0.05, 8.0])),  # 0.05: the clip really bites
        "num_experts": experts,
        "num_experts_per_tok": draw(st.sampled_from([k for k in (1, 2, 8) if k <= experts])),
        "norm_topk_prob": draw(st.booleans()),
    }


def _qwen3_extra(draw: st.DrawFn, config: dict[str, Any]) -> dict[str, Any]:
    return _qwen2_extra(draw, config) | {
        "attention_bias": draw(st.booleans()),
        "head_dim": config["head_dim"],
    }


def _olmo2_extra(draw: st.DrawFn, config: dict[str, Any]) -> dict[str, Any]:
    return {"attention_bias": draw(st.booleans())}  # head_dim is hidden_size // heads


def _gpt_neox_extra(draw: st.DrawFn, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "layer_norm_eps": config["rms_norm_eps"],
        "use_parallel_residual": draw(st.booleans()),
        "attention_bias": draw(st.booleans()),
        # at least 4 rotating dims: transformers' dynamic rope divides by (dims - 2)
        "partial_rotary_factor": draw(
            st.sampled_from(
                [
                    p
                    for p in (0.25, 0.5, 1.0)
                    if config["hidden_size"] // config["num_attention_heads"] * p >= 4
                ]
            )
        ),
        "num_key_value_heads": config["num_attention_heads"],  # no grouped-query attention
    }


def _phi_extra(draw: st.DrawFn, config: dict[str, Any]) -> dict[str, Any]:
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return {
        "layer_norm_eps": config["rms_norm_eps"],
        "qk_layernorm": draw(st.booleans()),
        "partial_rotary_factor": draw(st.sampled_from([p for p in (0.5, 1.0) if head_dim * p >= 4])),
    }


def _stablelm_extra(draw: st.DrawFn, config: dict[str, Any]) -> dict[str, Any]:
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return {
        "layer_norm_eps": config["rms_norm_eps"],
        "use_qkv_bias": draw(st.booleans()),
        "qk_layernorm": draw(st.booleans()),
        "use_parallel_residual": draw(st.booleans()),
        "partial_rotary_factor": draw(st.sampled_from([p for p in (0.25, 0.5, 1.0) if head_dim * p >= 4])),
    }


def _phi3_extra(draw: st.DrawFn, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "sliding_window": draw(st.sampled_from([None, 3, 8])),
        "original_max_position_embeddings": 8,  # longrope switches to its long factors past it
    }


def _gpt2_extra(draw: st.DrawFn, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "n_inner": draw(st.sampled_from([None, config["intermediate_size"]])),
        "activation_function": config["hidden_act"],
        "layer_norm_epsilon": config["rms_norm_eps"],
        "scale_attn_weights": draw(st.booleans()),
        "scale_attn_by_inverse_layer_idx": draw(st.booleans()),
        "num_key_value_heads": config["num_attention_heads"],
        "max_position_embeddings": 64,  # learned positions: room for the 40-token test sequences
    }


GPT2_ABSENT = ("rms_norm_eps", "num_key_value_heads", "intermediate_size", "hidden_act", "rope_parameters")


def _gemma2_extra(draw: st.DrawFn, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "attention_bias": draw(st.booleans()),
        "head_dim": config["head_dim"],
        "hidden_activation": config["hidden_act"],
        "sliding_window": draw(st.sampled_from([3, 8])),  # shorter than the test sequences
        "query_pre_attn_scalar": draw(st.sampled_from([16, 24])),
        "attn_logit_softcapping": draw(st.sampled_from([None, 0.5, 50.0])),  # 0.5: the cap really bites
        "final_logit_softcapping": draw(st.sampled_from([None, 0.3, 30.0])),
    }


def _gemma3_extra(draw: st.DrawFn, config: dict[str, Any]) -> dict[str, Any]:
    extra = _gemma2_extra(draw, config) | {"use_bidirectional_attention": draw(st.booleans())}
    layers = config["num_hidden_layers"]
    extra["layer_types"] = draw(
        st.lists(st.sampled_from(["sliding_attention", "full_attention"]), min_size=layers, max_size=layers)
    )
    return extra


def _per_kind_rope(draw: st.DrawFn, config: dict[str, Any]) -> dict[str, Any]:
    head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    return {
        "full_attention": draw(rope_parameters(32, head_dim, ("default", "linear"))),
        "sliding_attention": {"rope_type": "default", "rope_theta": draw(st.sampled_from([10000.0, 500.0]))},
    }


LLAMA_ONLY = ("rms_norm_eps", "num_key_value_heads")

ARCHS = {
    a.name: a
    for a in (
        Arch("llama", "Llama", sf_llama, "Llama", DECODER_HEADS, _llama_extra),
        Arch("gemma", "Gemma", sf_gemma, "Gemma", DECODER_HEADS[:4], _gemma_extra),
        Arch("gemma2", "Gemma2", sf_gemma2, "Gemma2", DECODER_HEADS[:4], _gemma2_extra, ("hidden_act",)),
        Arch(
            "gemma3_text",
            "Gemma3Text",
            sf_gemma3_text,
            "Gemma3Text",
            ("Model", "ForCausalLM", "ForSequenceClassification"),
            _gemma3_extra,
            ("hidden_act",),
            hf_names=(("ForCausalLM", "Gemma3ForCausalLM"),),
            rope_per_kind=True,
        ),
        Arch("mistral", "Mistral", sf_mistral, "Mistral", DECODER_HEADS, _mistral_extra),
        Arch("mixtral", "Mixtral", sf_mixtral, "Mixtral", DECODER_HEADS, _mixtral_extra),
        Arch("qwen2", "Qwen2", sf_qwen2, "Qwen2", DECODER_HEADS, _qwen2_extra),
        Arch("qwen3", "Qwen3", sf_qwen3, "Qwen3", DECODER_HEADS, _qwen3_extra),
        Arch("qwen2_moe", "Qwen2Moe", sf_qwen2_moe, "Qwen2Moe", DECODER_HEADS, _qwen2_moe_extra),
        Arch("qwen3_moe", "Qwen3Moe", sf_qwen3_moe, "Qwen3Moe", DECODER_HEADS, _qwen3_moe_extra),
        Arch("olmoe", "Olmoe", sf_olmoe, "Olmoe", DECODER_HEADS[:2], _olmoe_extra),
        Arch("olmo2", "Olmo2", sf_olmo2, "Olmo2", DECODER_HEADS[:2], _olmo2_extra),
        Arch("gpt_neox", "GPTNeoX", sf_gpt_neox, "GPTNeoX", DECODER_HEADS, _gpt_neox_extra, LLAMA_ONLY),
        Arch("phi", "Phi", sf_phi, "Phi", DECODER_HEADS[:4], _phi_extra, ("rms_norm_eps",)),
        Arch(
            "gpt2", "GPT2", sf_gpt2, "GPT2", DECODER_HEADS, _gpt2_extra, GPT2_ABSENT, causal_lm="LMHeadModel"
        ),
        Arch(
            "phi3",
            "Phi3",
            sf_phi3,
            "Phi3",
            DECODER_HEADS[:4],
            _phi3_extra,
            rope_types=("default", "longrope"),
        ),
        Arch(
            "stablelm",
            "StableLm",
            sf_stablelm,
            "StableLm",
            DECODER_HEADS[:4],
            _stablelm_extra,
            ("rms_norm_eps",),
        ),
    )
}


@st.composite
def rope_parameters(
    draw: st.DrawFn, max_position_embeddings: int, head_dim: int, types: tuple[str, ...] = ROPE_TYPES
) -> dict[str, Any]:
    rope_type = draw(st.sampled_from(types))
    params: dict[str, Any] = {
        "rope_type": rope_type,
        "rope_theta": draw(st.sampled_from([10000.0, 500000.0])),
    }
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
        n = head_dim // 2
        params["original_max_position_embeddings"] = original
        params["long_factor"] = [1.0 + i / n for i in range(n)]
        params["short_factor"] = [1.0 + i / (2 * n) for i in range(n)]
    return params


@st.composite
def small_configs(draw: st.DrawFn, arch: Arch) -> dict[str, Any]:
    """Small but varied decoder configs: GQA/MQA, explicit head_dim, biases, rope variants, tying, windows."""
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    hidden = heads * draw(st.sampled_from([8, 16]))
    config: dict[str, Any] = {
        "vocab_size": 97,
        "hidden_size": hidden,
        "intermediate_size": draw(st.sampled_from([40, 64])),
        "num_hidden_layers": draw(st.integers(1, 3)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": draw(st.sampled_from([8, 16])),
        "max_position_embeddings": 32,
        "rms_norm_eps": draw(st.sampled_from([1e-6, 1e-5])),
        "tie_word_embeddings": draw(st.booleans()),
        "pad_token_id": 0,
        "num_labels": draw(st.sampled_from([1, 3])),
        "hidden_act": draw(st.sampled_from(["silu", "gelu_pytorch_tanh", "gelu"])),
    }
    extra = arch.extra(draw, config)
    head_dim = extra.get("head_dim", hidden // heads)
    config = {k: v for k, v in config.items() if k != "head_dim"} | extra
    partial = config.pop("partial_rotary_factor", None)
    config["rope_parameters"] = draw(rope_parameters(32, int(head_dim * (partial or 1.0)), arch.rope_types))
    if arch.rope_per_kind:
        config["rope_parameters"] = _per_kind_rope(draw, config)
    if partial is not None:
        config["rope_parameters"]["partial_rotary_factor"] = partial
    return {k: v for k, v in config.items() if k not in arch.drop}


def hf_config(arch: Arch, values: dict[str, Any]) -> Any:
    values = dict(values)
    num_labels = values.pop("num_labels", 2)
    config = arch.hf_config(**values)
    config.num_labels = num_labels
    return config


def output_tensors(output: Any, head: str) -> dict[str, Any]:
    """The tensors a head returns, by name (the same names on both sides)."""
    names = {
        "Model": ("last_hidden_state",),
        "ForQuestionAnswering": ("start_logits", "end_logits"),
    }.get(head, ("logits",))
    return {name: getattr(output, name) for name in names}
