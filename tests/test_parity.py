"""Parity with Hugging Face Transformers, in both directions, over hypothesis-drawn small configs.

A `transformers` model saved with its own `save_pretrained` must load into the generated package with no
missing or unexpected keys and give the same numbers (1e-5 absolute, fp32), batched with left padding;
the generated model's `save_pretrained` output must load back into `transformers` and agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import ARCHS, Arch, hf_config, output_tensors, small_configs

from specformer.runtime.attention import missing_features

ATOL = 1e-5
# Sliding windows shorter than the test sequences, for the architectures that have them.
WINDOWED = {
    "mistral": {"sliding_window": 3},
    "qwen2": {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
    "qwen3": {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
}
PARAMS = [pytest.param(arch, id=name) for name, arch in ARCHS.items()]


def batch(vocab_size: int, seed: int, length: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """Three sequences, the first two left-padded with the pad id 0."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (3, length), generator=generator)
    mask = torch.ones_like(ids)
    for row, pad in ((0, 4), (1, 1)):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


def outputs(
    model: torch.nn.Module, task: str, ids: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return output_tensors(model(ids, attention_mask=mask), task)


def compare(task: str, expected: dict, actual: dict, mask: torch.Tensor) -> None:
    assert expected.keys() == actual.keys()
    for name in expected:
        want, got = expected[name], actual[name]
        if task != "ForSequenceClassification":  # per-position outputs: padding positions are undefined
            keep = mask.bool()
            want, got = want[keep], got[keep]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def saved_keys(folder: Path) -> set[str]:
    from specformer.runtime.checkpoint import checkpoint_files, iter_tensors

    return {key for key, _ in iter_tensors(checkpoint_files(folder))}


def save_hf(arch: Arch, task: str, values: dict, folder: Path) -> torch.nn.Module:
    model = arch.hf_class(task)(hf_config(arch, values)).eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("arch", PARAMS)
@given(data=st.data())
def test_hf_checkpoint_loads_and_matches(arch: Arch, data: st.DataObject, tmp_path_factory) -> None:
    values = data.draw(small_configs(arch), label="config")
    task = data.draw(st.sampled_from(arch.heads), label="task")
    folder = tmp_path_factory.mktemp("hf")
    reference = save_hf(arch, task, values, folder)
    ours = arch.ours_class(task).from_pretrained(folder)

    # the keys transformers writes (5.x renames some on save: GPT-NeoX's lm_head is `embed_out`), or,
    # where it converts an older layout as it loads (Mixtral's experts, stored one by one, stacked in
    # memory), the keys it holds
    held = set(reference.state_dict()) - {k for k in reference.state_dict() if k.endswith("lm_head.weight")
                                          and reference.config.tie_word_embeddings}  # fmt: skip
    assert set(ours.state_dict()) - set(ours.active_ties()) in (saved_keys(folder), held)
    # Longer than max_position_embeddings (32) sometimes, so dynamic and longrope rescale.
    length = data.draw(st.sampled_from([11, 40]), label="length")
    ids, mask = batch(values["vocab_size"], seed=len(values), length=length)
    expected = outputs(reference, task, ids, mask)
    for impl in ("sdpa", "eager", "flex_attention"):
        if missing_features(impl, ours.attention_features):  # e.g. SDPA cannot cap scores
            with pytest.raises(ValueError, match=f"`{impl}` cannot do what"):
                ours.set_attention(impl)
            continue
        ours.set_attention(impl)
        compare(task, expected, outputs(ours, task, ids, mask), mask)


@pytest.mark.parametrize("arch", PARAMS)
@given(data=st.data())
def test_saved_checkpoint_loads_in_transformers(arch: Arch, data: st.DataObject, tmp_path_factory) -> None:
    values = data.draw(small_configs(arch), label="config")
    task = data.draw(st.sampled_from(arch.heads), label="task")
    hf_folder, our_folder = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("ours")
    save_hf(arch, task, values, hf_folder)
    ours = arch.ours_class(task).from_pretrained(hf_folder)
    ours.save_pretrained(our_folder)

    reference = arch.hf_class(task).from_pretrained(our_folder).eval()
    ids, mask = batch(values["vocab_size"], seed=7)
    compare(task, outputs(reference, task, ids, mask), outputs(ours, task, ids, mask), mask)
    hf_keys = set(json.loads((hf_folder / "config.json").read_text())) - {"transformers_version"}
    assert set(json.loads((our_folder / "config.json").read_text())) == hf_keys


@pytest.mark.parametrize("arch", PARAMS)
def test_losses_match(arch: Arch, tmp_path: Path) -> None:
    values = {
        "vocab_size": 61,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "pad_token_id": 0,
    }
    ids = torch.randint(1, 61, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    token_labels = torch.randint(0, 3, (2, 9))
    token_labels[1, 5:] = -100
    cases = [
        ("ForCausalLM", {}, {"labels": labels}),
        ("ForSequenceClassification", {"num_labels": 3}, {"labels": torch.tensor([2, 0])}),
        ("ForSequenceClassification", {"num_labels": 1}, {"labels": torch.tensor([0.5, -1.5])}),
        ("ForSequenceClassification", {"num_labels": 3}, {"labels": torch.tensor([[1.0, 0, 1], [0, 1, 0]])}),
        ("ForTokenClassification", {"num_labels": 3}, {"labels": token_labels}),
        # an end position past the sequence is clamped and ignored, as for answers truncated away
        (
            "ForQuestionAnswering",
            {},
            {"start_positions": torch.tensor([1, 4]), "end_positions": torch.tensor([3, 20])},
        ),
    ]
    for i, (task, extra, targets) in enumerate(cases):
        if task not in arch.heads:
            continue
        folder = tmp_path / str(i)
        reference = save_hf(arch, task, values | extra, folder)
        ours = arch.ours_class(task).from_pretrained(folder)
        with torch.no_grad():
            expected = reference(ids, **targets).loss
            actual = ours(ids, **targets).loss
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", PARAMS)
def test_cached_decoding_matches_full_forward(arch: Arch, tmp_path: Path) -> None:
    """Prefill, then one token at a time through the cache, with left padding: same logits as one pass."""
    values = {"vocab_size": 53, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2}
    values |= {"num_attention_heads": 4, "num_key_value_heads": 1, "pad_token_id": 0} | WINDOWED.get(
        arch.name, {}
    )
    save_hf(arch, "ForCausalLM", values, tmp_path)
    model = arch.ours_class("ForCausalLM").from_pretrained(tmp_path)
    ids, mask = batch(53, seed=3)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        out = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        steps = [out.logits]
        for t in range(6, ids.shape[1]):
            out = model(
                ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                position_ids=torch.full((1, 1), t),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            steps.append(out.logits)
    compare("ForCausalLM", {"logits": full}, {"logits": torch.cat(steps, dim=1)}, mask)


@pytest.mark.parametrize("arch", PARAMS)
def test_logits_to_keep(arch: Arch, tmp_path: Path) -> None:
    values = {"vocab_size": 53, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 1}
    values |= {"num_attention_heads": 2, "num_key_value_heads": 2, "pad_token_id": 0}
    save_hf(arch, "ForCausalLM", values, tmp_path)
    model = arch.ours_class("ForCausalLM").from_pretrained(tmp_path)
    ids = torch.randint(1, 53, (2, 7))
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
        picked = model(ids, logits_to_keep=torch.tensor([0, 4])).logits
    assert last.shape == (2, 1, 53)
    torch.testing.assert_close(last, full[:, -1:])
    torch.testing.assert_close(picked, full[:, [0, 4]])


@pytest.mark.parametrize("parallel", [False, True])
def test_per_head_layer_norms_match(parallel: bool, tmp_path: Path) -> None:
    """StableLM's `q_layernorm.norms.<h>` (a LayerNorm per head), with grouped-query attention."""
    arch = ARCHS["stablelm"]
    values = {"vocab_size": 53, "hidden_size": 64, "intermediate_size": 40, "num_hidden_layers": 2}
    values |= {"num_attention_heads": 4, "num_key_value_heads": 2, "qk_layernorm": True}
    values |= {"use_parallel_residual": parallel, "use_qkv_bias": True, "pad_token_id": 0}
    reference = save_hf(arch, "ForCausalLM", values, tmp_path)
    with torch.no_grad():  # distinct per-head weights, so a mix-up of heads shows
        for name, p in reference.named_parameters():
            if "layernorm.norms" in name:
                p.copy_(torch.randn_like(p))
    reference.save_pretrained(tmp_path)
    ours = arch.ours_class("ForCausalLM").from_pretrained(tmp_path)
    assert "model.layers.0.self_attn.k_layernorm.norms.1.weight" in ours.state_dict()
    ids, mask = batch(53, seed=5)
    compare(
        "ForCausalLM",
        outputs(reference, "ForCausalLM", ids, mask),
        outputs(ours, "ForCausalLM", ids, mask),
        mask,
    )


def test_an_older_gpt_neox_checkpoint_loads(tmp_path: Path) -> None:
    """Pythia as published: `rotary_pct`/`rotary_emb_base` at the top of config.json instead of
    `rope_parameters`, and causal-mask buffers (`attention.bias`, `attention.masked_bias`) in the weights."""
    from safetensors.torch import load_file, save_file

    arch = ARCHS["gpt_neox"]
    values = {"vocab_size": 53, "hidden_size": 64, "intermediate_size": 40, "num_hidden_layers": 2}
    values |= {
        "num_attention_heads": 4,
        "rope_parameters": {"rope_theta": 20000.0, "partial_rotary_factor": 0.5},
    }
    reference = save_hf(arch, "ForCausalLM", values, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]
    (tmp_path / "config.json").write_text(json.dumps(config | {"rotary_pct": 0.5, "rotary_emb_base": 20000}))
    weights = load_file(tmp_path / "model.safetensors")
    for layer in range(2):
        weights[f"gpt_neox.layers.{layer}.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
        weights[f"gpt_neox.layers.{layer}.attention.masked_bias"] = torch.tensor(-1e9)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = arch.ours_class("ForCausalLM").from_pretrained(tmp_path)
    assert ours.config.rope_parameters["partial_rotary_factor"] == 0.5
    assert ours.config.rope_parameters["rope_theta"] == 20000
    ids, mask = batch(53, seed=2)
    compare(
        "ForCausalLM",
        outputs(reference, "ForCausalLM", ids, mask),
        outputs(ours, "ForCausalLM", ids, mask),
        mask,
    )


def test_bidirectional_sliding_windows_match(tmp_path: Path) -> None:
    """Gemma 3 with bidirectional attention: transformers halves the window, which then counts keys on
    both sides of each query."""
    arch = ARCHS["gemma3_text"]
    values = {"vocab_size": 53, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2}
    values |= {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "pad_token_id": 0}
    values |= {
        "use_bidirectional_attention": True,
        "sliding_window": 6,
        "layer_types": ["sliding_attention"] * 2,
    }
    reference = save_hf(arch, "Model", values, tmp_path)
    ours = arch.ours_class("Model").from_pretrained(tmp_path)
    ids, mask = batch(53, seed=4, length=16)
    for impl in ("eager", "sdpa"):
        ours.set_attention(impl)
        compare("Model", outputs(reference, "Model", ids, mask), outputs(ours, "Model", ids, mask), mask)


@pytest.mark.parametrize("with_token_ids", [True, False])
def test_gpt2_double_heads_match(with_token_ids: bool, tmp_path: Path) -> None:
    """GPT2DoubleHeadsModel: a language model over each choice plus a score per choice read at its
    classification token (the last one when none is given); both losses; saved, transformers loads it."""
    import transformers

    from specformer.generated.gpt2 import GPT2DoubleHeadsModel

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=53, n_embd=32, n_layer=2, n_head=4, n_positions=16)
    reference = transformers.GPT2DoubleHeadsModel(config).eval()
    reference.save_pretrained(tmp_path / "hf")
    ours = GPT2DoubleHeadsModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 53, (2, 3, 7))
    inputs = {
        "input_ids": ids,
        "mc_token_ids": torch.tensor([[6, 4, 5], [2, 6, 6]]) if with_token_ids else None,
        "labels": ids,
        "mc_labels": torch.tensor([2, 0]),
    }
    with torch.no_grad():
        expected, actual = reference(**inputs), ours(**inputs)
        for name in ("logits", "mc_logits", "loss", "mc_loss"):
            torch.testing.assert_close(getattr(actual, name), getattr(expected, name), atol=1e-5, rtol=0)
        ours.save_pretrained(tmp_path / "ours")
        again = transformers.GPT2DoubleHeadsModel.from_pretrained(tmp_path / "ours").eval()
        torch.testing.assert_close(again(**inputs).mc_logits, expected.mc_logits, atol=1e-5, rtol=0)
