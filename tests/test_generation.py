"""generate() against transformers: greedy and beam search token for token, scores, processors, batching."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from reference import ARCHS, hf_config

from specformer.runtime.generation import GenerationConfig, TextIteratorStreamer, generate

SMALL = {"vocab_size": 67, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2}
SMALL |= {
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "pad_token_id": 0,
    "eos_token_id": 5,
    "bos_token_id": 1,
}
EXTRA = {
    "mistral": {"sliding_window": 4},
    "qwen2": {"use_sliding_window": True, "sliding_window": 4},
    "qwen3": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    "gemma2": {"sliding_window": 4, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0},
    "gemma3_text": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
}


def pair(name: str, tmp_path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    arch = ARCHS[name]
    reference = arch.hf_class("ForCausalLM")(hf_config(arch, SMALL | EXTRA.get(name, {}))).eval()
    reference.save_pretrained(tmp_path)
    return arch.ours_class("ForCausalLM").from_pretrained(tmp_path), reference


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 67, (3, 7), generator=generator)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding
    ids[2, :1], mask[2, :1] = 0, 0
    return ids, mask


CASES = {
    "greedy": {"max_new_tokens": 12},
    "beams": {"max_new_tokens": 10, "num_beams": 4, "length_penalty": 1.3},
    "beams-early": {"max_new_tokens": 10, "num_beams": 3, "early_stopping": True, "num_return_sequences": 2},
    "beams-never": {"max_new_tokens": 8, "num_beams": 2, "early_stopping": "never", "length_penalty": -0.5},
    "processors": {
        "max_new_tokens": 12,
        "repetition_penalty": 1.3,
        "no_repeat_ngram_size": 2,
        "min_new_tokens": 4,
        "bad_words_ids": [[7], [8, 9]],
    },
}


@pytest.mark.parametrize(
    "name",
    [
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "olmo2",
        "gpt_neox",
        "gpt2",
        "phi",
        "phi3",
        "stablelm",
        "gemma2",
        "gemma3_text",
    ],
)
@pytest.mark.parametrize("case", CASES)
def test_matches_transformers(name: str, case: str, tmp_path: Path) -> None:
    ours, reference = pair(name, tmp_path)
    ids, mask = prompts()
    settings = CASES[case] | {"output_scores": True, "return_dict_in_generate": True}
    expected = reference.generate(ids, attention_mask=mask, do_sample=False, **settings)
    actual = generate(ours, ids, mask, **settings)
    assert after_eos_padded(actual.sequences, ids.shape[1]) == after_eos_padded(
        expected.sequences, ids.shape[1]
    )
    assert len(actual.scores) == len(expected.scores)
    for got, want in zip(actual.scores, expected.scores, strict=True):
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got))
        torch.testing.assert_close(got[finite], want[finite], atol=1e-5, rtol=0)
    if "num_beams" in settings:
        torch.testing.assert_close(actual.sequences_scores, expected.sequences_scores, atol=1e-5, rtol=0)


def after_eos_padded(sequences: torch.Tensor, prompt: int) -> list[list[int]]:
    """Rows with everything after their first generated EOS set to the pad id. transformers' beam search
    fills finished hypotheses with `pad_token_id or eos_token_id`, so with pad id 0 it writes EOS there;
    specformer writes the pad id, as its greedy search and transformers' own greedy search do."""
    rows = sequences.tolist()
    for row in rows:
        new = row[prompt:]
        if SMALL["eos_token_id"] in new:
            end = prompt + new.index(SMALL["eos_token_id"]) + 1
            row[end:] = [SMALL["pad_token_id"]] * (len(row) - end)
    return rows


def test_sampling_is_seeded_and_bounded(tmp_path: Path) -> None:
    ours, _ = pair("llama", tmp_path)
    ids, mask = prompts()
    settings = {"max_new_tokens": 8, "do_sample": True, "top_k": 5, "top_p": 0.9, "temperature": 0.7}
    first = generate(ours, ids, mask, generator=torch.Generator().manual_seed(3), **settings)
    again = generate(ours, ids, mask, generator=torch.Generator().manual_seed(3), **settings)
    assert first.tolist() == again.tolist()
    several = generate(
        ours, ids, mask, num_return_sequences=3, generator=torch.Generator().manual_seed(3), **settings
    )
    assert several.shape[0] == 9
    for settings_extra in ({"min_p": 0.2}, {"typical_p": 0.5}, {"num_beams": 2}):
        out = generate(
            ours, ids, mask, generator=torch.Generator().manual_seed(1), **(settings | settings_extra)
        )
        assert out.shape[0] == 3 and out.shape[1] <= ids.shape[1] + 8


def test_eos_finishes_rows_and_pads_them(tmp_path: Path) -> None:
    ours, reference = pair("llama", tmp_path)
    ids, mask = prompts()
    greedy = generate(ours, ids, mask, max_new_tokens=6)
    eos = int(greedy[1, ids.shape[1] + 1])  # make the second generated token of row 1 the end
    out = generate(ours, ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    expected = reference.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=eos
    )
    assert out.tolist() == expected.tolist()
    assert (out[1, ids.shape[1] + 2 :] == 0).all()


def test_generation_config_round_trip(tmp_path: Path) -> None:
    config = GenerationConfig(max_new_tokens=7, do_sample=True, top_p=0.8, eos_token_id=[2, 3])
    config.extra["custom_setting"] = {"keep": True}
    config.save_pretrained(tmp_path)
    again = GenerationConfig.from_pretrained(tmp_path)
    assert again == config
    hf = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (hf.max_new_tokens, hf.top_p, hf.eos_token_id) == (7, 0.8, [2, 3])


def test_iterator_streamer_yields_the_generated_text(tmp_path: Path) -> None:
    from test_textgen import make_checkpoint

    from specformer.runtime.auto import load_causal_lm

    make_checkpoint(tmp_path)
    model, tokenizer = load_causal_lm(tmp_path)
    prompt = torch.tensor([tokenizer.encode("the quick")])
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=30)
    thread = threading.Thread(
        target=generate, args=(model, prompt), kwargs={"max_new_tokens": 12, "streamer": streamer}
    )
    thread.start()
    pieces = list(streamer)
    thread.join()
    full = generate(model, prompt, max_new_tokens=12)
    assert "".join(pieces) == tokenizer.decode(full[0, prompt.shape[1] :], skip_special_tokens=True)


def test_assisted_and_prompt_lookup_decoding_equal_greedy(tmp_path: Path) -> None:
    ours, _ = pair("llama", tmp_path / "main")
    draft_reference = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            **(SMALL | {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2})
        )
    )
    draft_reference.save_pretrained(tmp_path / "draft")
    draft = ARCHS["llama"].ours_class("ForCausalLM").from_pretrained(tmp_path / "draft")
    prompt = torch.tensor([[9, 10, 11, 12, 9, 10, 11]])
    greedy = generate(ours, prompt, max_new_tokens=20, eos_token_id=None)
    assisted = generate(ours, prompt, max_new_tokens=20, eos_token_id=None, assistant_model=draft)
    lookup = generate(ours, prompt, max_new_tokens=20, eos_token_id=None, prompt_lookup_num_tokens=4)
    assert assisted.tolist() == greedy.tolist()
    assert lookup.tolist() == greedy.tolist()
    self_draft = generate(ours, prompt, max_new_tokens=20, eos_token_id=None, assistant_model=ours)
    assert self_draft.tolist() == greedy.tolist()


def test_speculative_sampling_keeps_the_model_distribution(tmp_path: Path) -> None:
    """The rejection rule makes the first token follow the main model's distribution even though a
    different, smaller draft proposes it (checked on frequencies over many draws)."""
    ours, _ = pair("llama", tmp_path / "main")
    small = SMALL | {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2}
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**small)).save_pretrained(tmp_path / "draft")
    draft = ARCHS["llama"].ours_class("ForCausalLM").from_pretrained(tmp_path / "draft")
    with torch.no_grad():  # sharpen both, differently, so that a wrong acceptance rule would show
        ours.lm_head.weight.mul_(30)
        draft.lm_head.weight.mul_(80)
    prompt = torch.tensor([[9, 10, 11]])
    with torch.no_grad():
        expected = (ours(prompt).logits[0, -1] / 0.3).softmax(-1)
        proposed = (draft(prompt).logits[0, -1] / 0.3).softmax(-1)
    assert (expected - proposed).abs().max() > 0.2
    counts = torch.zeros(67)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    draws = 600
    for _ in range(draws):
        # two new tokens: the first is a draft proposal that the rule keeps or replaces
        out = generate(ours, prompt, max_new_tokens=2, do_sample=True, top_k=None, temperature=0.3,
                       eos_token_id=None, assistant_model=draft, generator=generator)  # fmt: skip
        counts[out[0, prompt.shape[1]]] += 1
    assert (counts / draws - expected).abs().max() < 0.06


def test_stop_strings_and_max_time(tmp_path: Path) -> None:
    from test_textgen import make_checkpoint

    from specformer.runtime.auto import load_causal_lm

    make_checkpoint(tmp_path)
    model, tokenizer = load_causal_lm(tmp_path)
    prompt = torch.tensor([tokenizer.encode("the quick")])
    full = generate(model, prompt, max_new_tokens=12, eos_token_id=None)
    target = tokenizer.decode(full[0, prompt.shape[1] + 3 : prompt.shape[1] + 4])
    stopped = generate(
        model, prompt, max_new_tokens=12, eos_token_id=None, stop_strings=[target], tokenizer=tokenizer
    )
    assert stopped.shape[1] <= prompt.shape[1] + 4
    assert target in tokenizer.decode(stopped[0, prompt.shape[1] :])
    with pytest.raises(ValueError, match="stop_strings need the tokenizer"):
        generate(model, prompt, max_new_tokens=3, stop_strings=["x"])
    quick = generate(model, prompt, max_new_tokens=500, eos_token_id=None, max_time=0.0)
    assert quick.shape[1] == prompt.shape[1] + 1  # the time is up after the first token


def test_a_right_padded_batch_warns() -> None:
    from specformer.generated.llama import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2)).eval()  # fmt: skip
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    with pytest.warns(UserWarning, match="right-padded"):
        generate(model, ids, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]), max_new_tokens=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # left padding is the right way: no warning
        generate(model, ids, attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]), max_new_tokens=2)
