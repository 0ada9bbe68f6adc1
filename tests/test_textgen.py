"""Tokenizer files, chat templates, the model registry and the decoding loop, on self-made checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as FastTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from specformer.generated.llama import LlamaConfig, LlamaForCausalLM
from specformer.runtime.auto import generated_packages, load_causal_lm, model_class
from specformer.runtime.generation import generate
from specformer.runtime.tokenizer import TemplateError, Tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_checkpoint(folder: Path) -> None:
    backend = FastTokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(["hello world", "the quick brown fox", "numbers 123 456"] * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    settings = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    config = LlamaConfig(
        vocab_size=backend.get_vocab_size(),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=0,
        eos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    make_checkpoint(folder)
    return folder


def test_tokenizer_from_pretrained_round_trips(checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1)
    ids = tokenizer.encode("hello world 123")
    assert tokenizer.decode(ids) == "hello world 123"
    with_special = tokenizer.encode("<|user|>hello</s>")
    assert with_special[0] == tokenizer.backend.token_to_id("<|user|>")
    assert tokenizer.decode(with_special, skip_special_tokens=True) == "hello"


def test_chat_template_renders_sandboxed(checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": "hello"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>hello</s><|assistant|>"
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == tokenizer.encode(text)
    tokenizer.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(TemplateError, match="reads `__class__` of a list, which templates may not"):
        tokenizer.apply_chat_template(messages)
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(TemplateError, match="roles must alternate"):
        tokenizer.apply_chat_template(messages)


def test_registry_finds_generated_packages() -> None:
    assert {"llama", "gemma"} <= set(generated_packages())
    assert model_class("llama").__name__ == "LlamaForCausalLM"
    assert model_class("gemma", "ForSequenceClassification").__name__ == "GemmaForSequenceClassification"
    with pytest.raises(ValueError, match=r"unknown model_type `lama`; known: .*llama"):
        model_class("lama")


def test_greedy_generation_matches_a_cacheless_loop(checkpoint: Path) -> None:
    model, tokenizer = load_causal_lm(checkpoint)
    prompt = torch.tensor([tokenizer.encode("the quick")])
    out = generate(model, prompt, max_new_tokens=8)
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat((ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert out.tolist() == ids.tolist()


def test_sampling_is_reproducible_and_stops_at_eos(checkpoint: Path) -> None:
    model, _ = load_causal_lm(checkpoint)
    prompt = torch.tensor([[5, 6, 7]])

    def sample(seed: int, **kwargs: float) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return generate(model, prompt, max_new_tokens=10, temperature=1.0, generator=generator, **kwargs)[
            0
        ].tolist()

    assert sample(1) == sample(1)
    assert sample(1, top_p=0.5) == sample(1, top_p=0.5)
    # a tiny top_p keeps only the most likely token: sampling becomes greedy
    assert sample(3, top_p=1e-6) == generate(model, prompt, max_new_tokens=10)[0].tolist()
    first = generate(model, prompt, max_new_tokens=1)[0, -1].item()
    stopped = generate(model, prompt, max_new_tokens=10, eos_token_id=first)
    assert stopped.shape[1] == prompt.shape[1] + 1


def test_generate_checks_its_arguments(checkpoint: Path) -> None:
    model, _ = load_causal_lm(checkpoint)
    with pytest.raises(ValueError, match=r"input_ids is \(3,\); expected a \(batch, prompt_length\) tensor"):
        generate(model, torch.zeros(3, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"num_return_sequences \(3\) has to be smaller or equal to num_beams"
    ):
        generate(model, torch.zeros(1, 3, dtype=torch.long), num_return_sequences=3)
    with pytest.raises(TypeError, match="unknown generation argument"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), max_new_tokenz=3)
    with pytest.warns(UserWarning, match="`do_sample` is False, so top_p will be ignored"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=1, top_p=0.5)


BROKEN_TOKENIZER_FILES = {
    "truncated tokenizer.json": (
        "tokenizer.json",
        lambda text: text[: len(text) // 2],
        "not a valid tokenizer.json",
    ),
    "tokenizer.json not JSON": ("tokenizer.json", lambda text: "{nope", "not a valid tokenizer.json"),
    "broken tokenizer_config.json": (
        "tokenizer_config.json",
        lambda text: text[:-3],
        "not valid JSON at line 1",
    ),
    "tokenizer_config.json a list": (
        "tokenizer_config.json",
        lambda text: "[1, 2]",
        "expected a JSON object",
    ),
    "chat_template a number": (
        "tokenizer_config.json",
        lambda text: '{"chat_template": 3}',
        "`chat_template` is int",
    ),
    "template list of junk": ("tokenizer_config.json", lambda text: '{"chat_template": [1, {"a": 2}]}', None),
    "padding side": (
        "tokenizer_config.json",
        lambda text: '{"padding_side": "middle"}',
        "`padding_side` is 'middle'",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_TOKENIZER_FILES))
def test_broken_tokenizer_files_raise_a_tokenizer_error(checkpoint: Path, tmp_path: Path, case: str) -> None:
    import shutil

    from specformer.runtime.tokenizer import TokenizerError

    name, corrupt, message = BROKEN_TOKENIZER_FILES[case]
    folder = tmp_path / "tok"
    shutil.copytree(checkpoint, folder)
    (folder / name).write_text(corrupt((folder / name).read_text()))
    if message is None:  # unusable entries are skipped, not fatal
        assert Tokenizer.from_pretrained(folder).chat_template is None
        return
    with pytest.raises(TokenizerError, match=message) as err:
        Tokenizer.from_pretrained(folder)
    assert name in str(err.value)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "more than 1,000,000 steps",
        ),
        ("{{ 'x' * 10 ** 12 }}", "more than 10,000,000 items"),
        ("{{ 2 ** 10000000 }}", "power too large"),
    ],
)
def test_chat_templates_are_bounded_in_steps_and_size(checkpoint: Path, template: str, message: str) -> None:
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    tokenizer.chat_template = template
    with pytest.raises(TemplateError, match=message):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
