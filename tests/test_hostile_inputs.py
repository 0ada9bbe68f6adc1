"""A battery of corrupt and hostile inputs, as an attacker or an unlucky user would hand them over:
specs, config.json files, weights, shard indexes, save journals, GGUF files, tokenizers, chat templates
and generation arguments. Every one must end in the library's own error (a `SpecformerError`) that names
what was wrong; none may run code, crash with a raw exception, hang or take memory without bound.

Each input runs in a forked child: the parent reads the outcome from a pipe and the child's peak memory
from the kernel (`wait4`), so a blow-up cannot take the test run down with it. A watchdog kills a
child that hangs (a detector for hangs, not a speed limit); `bench/hostile_inputs.py` prints the time
and memory each input takes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from specformer.dsl.errors import SpecformerError

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="each input runs in a forked child")

HANG = 60  # seconds: a child still running then is hung
MEMORY = 2**30  # bytes an input may add to the process's peak resident memory

Action = Callable[[], object]


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path, Path], Action]  # (a fresh folder, the shared valid artifacts) -> what to run
    mentions: str | None = None  # a text the error message must contain (a key, a file name)


CASES: list[Case] = []


def case(name: str, mentions: str | None = None) -> Callable:
    def register(build: Callable[[Path, Path], Action]) -> Callable[[Path, Path], Action]:
        CASES.append(Case(name, build, mentions))
        return build

    return register


# ---- shared valid artifacts, built once ------------------------------------------------------------
TINY = {
    "vocab_size": 96, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
}  # fmt: skip


def make_valid_artifacts(root: Path) -> Path:
    """The valid inputs the hostile ones are made from: a tiny Llama checkpoint (single file and sharded),
    its tokenizer folder and a GGUF file of it."""
    from gguf_files import bpe_tokenizer, write_gguf

    from specformer.generated.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="2KB")
    tokenizer = bpe_tokenizer(TINY["vocab_size"])
    (root / "tokenizer").mkdir()
    tokenizer.save(str(root / "tokenizer" / "tokenizer.json"))
    settings = {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "chat_template": "{{ messages[0]['content'] }}",
    }
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(settings))
    write_gguf(root / "model.gguf", "llama", model, "F32", tokenizer)
    return root


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_valid_artifacts(tmp_path_factory.mktemp("valid"))


# ---- running one input -----------------------------------------------------------------------------
def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_isolated(action: Action) -> tuple[dict, int]:
    """Run `action` in a forked child: (its outcome, how many bytes it added to peak resident memory)."""
    read, write = os.pipe()
    before = _resident_bytes()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        os.close(read)
        # OpenMP's thread pool does not survive fork: a parallel region in the child could deadlock
        torch.set_num_threads(1)
        outcome: dict = {"error": None}
        start = time.perf_counter()
        try:
            signal.alarm(HANG)
            action()
        except BaseException as err:
            outcome = {
                "error": type(err).__name__,
                "library": isinstance(err, SpecformerError),
                "message": str(err)[:2000],
                "trace": traceback.format_exc()[-3000:],
            }
        outcome["seconds"] = time.perf_counter() - start
        with os.fdopen(write, "w") as pipe:
            json.dump(outcome, pipe)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    _, status, usage = os.wait4(pid, 0)
    if not text:
        reason = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"status {status}"
        return {"error": "died", "library": False, "message": reason, "trace": ""}, 0
    return json.loads(text), max(usage.ru_maxrss * 1024 - before, 0)


@pytest.mark.parametrize("item", CASES, ids=lambda c: c.name)
def test_hostile_input_gets_a_library_error(item: Case, valid: Path, tmp_path: Path) -> None:
    action = item.build(tmp_path, valid)
    outcome, grown = run_isolated(action)
    assert outcome["error"] is not None, f"{item.name}: accepted without an error"
    assert outcome["library"], f"{item.name}: {outcome['error']}: {outcome['message']}\n{outcome['trace']}"
    if item.mentions is not None:
        assert item.mentions in outcome["message"], outcome["message"]
    assert grown < MEMORY, f"{item.name}: grew peak memory by {grown / 2**20:.0f} MiB"


def test_the_battery_is_large() -> None:
    assert len(CASES) >= 150, len(CASES)
    assert len({c.name for c in CASES}) == len(CASES)


# ---- specs: opened with AutoModelForCausalLM.from_spec -----------------------------------------------
def _from_spec(folder: Path, data: bytes | str, config: dict | None = None) -> Action:
    from specformer.runtime.auto import AutoModelForCausalLM

    path = folder / "hostile.sf"
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return lambda: AutoModelForCausalLM.from_spec(path, config if config is not None else dict(TINY))


DELTA = 'model H extends Llama {{ model_type = "h"  {} }}'
TINY_SPEC = """model T {{
  config {{
    vocab_size: int = 10
    hidden_size: int = 8
    {config}
  }}
  {blocks}
  backbone Model as model {{
    embed_tokens = Embedding(vocab_size, hidden_size)
    {subs}
    forward(input_ids) {{ {body} }}
  }}
  head ForCausalLM: causal_lm {{
    lm_head = Linear(hidden_size, vocab_size, bias = false)
    forward(h) {{ return lm_head(h) }}
  }}
}}
"""


def tiny_spec(
    config: str = "", blocks: str = "", subs: str = "", body: str = "return embed_tokens(input_ids)"
) -> str:
    return TINY_SPEC.format(config=config, blocks=blocks, subs=subs, body=body)


SPEC_TEXTS = {
    # code, where a name or a string is expected
    "string-breaks-out": DELTA.format('config { a: str = "x\\"); import os; (\\"" }'),
    "newline-in-string": 'model H extends Llama { model_type = "a\nb" }',
    "carriage-return-in-string": 'model H extends Llama { model_type = "a\rimport os" }',
    "nul-in-string": 'model H extends Llama { model_type = "a\x00b" }',
    "bidi-override-in-name": "model H\u202e extends Llama { }",
    "zero-width-in-name": "model H\u200b extends Llama { }",
    "fullwidth-letters": "ｍodel H extends Llama { }",
    "dunder-field": DELTA.format("config { __class__: int = 1 }"),
    "dunder-submodule": DELTA.format("MLP.__dict__ = Linear(1, 2)"),
    "dunder-attribute": tiny_spec(body="return embed_tokens(input_ids).__class__"),
    "python-keyword-local": tiny_spec(body="lambda = embed_tokens(input_ids) return lambda"),
    "import-call": tiny_spec(body="return __import__(input_ids)"),
    "eval-call": tiny_spec(body="return eval(input_ids)"),
    "exec-local": tiny_spec(body="exec = embed_tokens(input_ids) return exec"),
    "os-system": tiny_spec(body="return os.system(input_ids)"),
    "getattr-call": tiny_spec(body="return getattr(input_ids, input_ids)"),
    "open-call": tiny_spec(body="return open(input_ids)"),
    "torch-load": tiny_spec(body="return torch.load(input_ids)"),
    "config-default-import": tiny_spec(config="a: any = __import__"),
    "config-default-attribute": tiny_spec(config="a: any = vocab_size.__class__"),
    "config-default-lambda": tiny_spec(config="a: any = lambda: 1"),
    # names that would shadow generated or runtime code
    "field-named-kwargs": tiny_spec(config="kwargs: int = 1"),
    "field-named-self": tiny_spec(config="self: int = 1"),
    "field-named-config": tiny_spec(config="config: int = 1"),
    "local-named-mask": tiny_spec(body="mask = embed_tokens(input_ids) return mask"),
    "local-named-rope": tiny_spec(body="rope = embed_tokens(input_ids) return rope"),
    "local-named-attend": tiny_spec(body="attend = embed_tokens(input_ids) return attend"),
    "local-named-torch": tiny_spec(body="torch = embed_tokens(input_ids) return torch"),
    "local-named-nn": tiny_spec(body="nn = embed_tokens(input_ids) return nn"),
    "block-named-linear": tiny_spec(
        blocks="block Linear { n = RMSNorm(hidden_size) forward(x) { return n(x) } }"
    ),
    "block-named-rmsnorm": tiny_spec(
        blocks="block RMSNorm { n = Linear(hidden_size, hidden_size) forward(x) { return n(x) } }",
        subs="a = RMSNorm\n    b = RMSNorm(hidden_size)",
    ),
    "block-named-like-config": tiny_spec(
        blocks="block Config { n = RMSNorm(hidden_size) forward(x) { return n(x) } }"
    ),
    "submodule-named-forward": tiny_spec(subs="forward = Linear(hidden_size, hidden_size)"),
    "submodule-named-training": tiny_spec(subs="training = Linear(hidden_size, hidden_size)"),
    "submodule-named-config": tiny_spec(subs="config = Linear(hidden_size, hidden_size)"),
    # sizes the model cannot have
    "negative-size": tiny_spec(subs="p = Linear(hidden_size, -4)"),
    "zero-size": tiny_spec(subs="p = Linear(hidden_size, 0)"),
    "float-size": tiny_spec(subs="p = Linear(hidden_size, 2.5)"),
    "string-size": tiny_spec(subs='p = Linear(hidden_size, "8")'),
    "bool-size": tiny_spec(subs="p = Linear(hidden_size, true)"),
    "none-size": tiny_spec(subs="p = Linear(hidden_size, none)"),
    "size-from-missing-field": tiny_spec(subs="p = Linear(hidden_size, nowhere)"),
    # expressions that would take the machine's time or memory
    "tower-of-powers": tiny_spec(config="huge: any = 2 ** 2 ** 40"),
    "big-product": tiny_spec(config="huge: any = (2 ** 4000) * (2 ** 4000)"),
    "huge-list": tiny_spec(config="huge: any = [0] * 10 ** 9"),
    "huge-string": tiny_spec(config='huge: any = "x" * 10 ** 9'),
    "nested-comprehensions": tiny_spec(
        config="huge: any = [[[i for i in range(1024)] for j in range(1024)] for k in range(1024)]"
    ),
    "huge-range": tiny_spec(config="huge: any = sum(range(10 ** 12))"),
    "huge-repeat": tiny_spec(
        blocks="block L { n = RMSNorm(hidden_size) forward(x) { return n(x) } }",
        subs="layers = repeat(10 ** 9, L)",
    ),
    "nested-repeats": tiny_spec(
        blocks="block L { n = RMSNorm(hidden_size) forward(x) { return n(x) } }\n"
        "block M { l = repeat(1024, L) forward(x) { return l(x) } }",
        subs="m = repeat(1024, M)",
    ),
    "deep-lists": tiny_spec(config="a: any = " + "[" * 100_000 + "1" + "]" * 100_000),
    "deep-negations": tiny_spec(config="a: any = " + "not " * 100_000 + "true"),
    "long-sum": tiny_spec(config="a: int = " + "+".join(["1"] * 30000)),
    "deep-unary": tiny_spec(config="a: int = " + "-" * 20000 + "1"),
    "long-conditional-chain": tiny_spec(config="a: int = " + " if true else ".join(["1"] * 5000)),
    "deep-calls": tiny_spec(body="return " + "embed_tokens(" * 3000 + "input_ids" + ")" * 3000),
    "many-fields": tiny_spec(config="\n".join(f"f{i}: int = {i}" for i in range(20000))),
    "division-by-zero": tiny_spec(config="a: int = vocab_size // 0"),
    "modulo-by-zero": tiny_spec(config="a: int = vocab_size % 0"),
    "float-overflow": tiny_spec(config="a: float = 1e308 * 1e308"),
    "type-mismatch": tiny_spec(config='a: int = "eight"'),
    "cyclic-defaults": tiny_spec(config="a: int = b\n    b: int = a"),
    # structure
    "extends-cycle": 'model A extends B { model_type = "a" }\nmodel B extends A { model_type = "b" }',
    "extends-itself": 'model A extends A { model_type = "a" }',
    "deep-extends": "\n".join(
        f'model M{i} extends {"Llama" if i == 0 else f"M{i - 1}"} {{ model_type = "m{i}" }}'
        for i in range(60)
    ),
    "block-recursion": DELTA.format("MLP.again = MLP"),
    "mutual-block-recursion": tiny_spec(
        blocks="block A { b = B forward(x) { return b(x) } }\nblock B { a = A forward(x) { return a(x) } }",
        subs="a = A",
    ),
    "replaces-installed-llama": 'model Llama { model_type = "llama" }',
    "unknown-primitive": tiny_spec(subs="p = Conv9d(hidden_size)"),
    "unknown-builtin": tiny_spec(body="return fft(embed_tokens(input_ids))"),
    "unknown-activation": tiny_spec(config="act: activation = sparkle"),
    "unknown-task": tiny_spec().replace("causal_lm", "world_domination"),
    "no-model": "# nothing here\n",
    "empty": "",
    "only-whitespace": " \n\t\n",
    "truncated": tiny_spec()[: len(tiny_spec()) // 2],
    "unbalanced-braces": tiny_spec() + "}}}",
    "return-nothing": tiny_spec(body="x = embed_tokens(input_ids)"),
    "unused-submodule-call-arity": tiny_spec(body="return embed_tokens(input_ids, input_ids, input_ids)"),
    "two-models-same-name": tiny_spec() + tiny_spec(),
    "remove-unknown-field": DELTA.format("config { remove nowhere }"),
    "parallel-unknown-style": DELTA.format("Attention.parallel q_proj: diagonal"),
}
for _name, _text in SPEC_TEXTS.items():
    case(f"spec-{_name}")(lambda folder, valid, text=_text: _from_spec(folder, text))


@case("spec-not-utf8", mentions="not UTF-8")
def _(folder: Path, valid: Path) -> Action:
    return _from_spec(folder, tiny_spec().replace("model T", "model T\xe9").encode("latin-1"))


@case("spec-nul-bytes")
def _(folder: Path, valid: Path) -> Action:
    return _from_spec(folder, b"model T {\x00\x00}")


@case("spec-huge-sparse-file", mentions="the limit is")
def _(folder: Path, valid: Path) -> Action:
    from specformer.runtime.auto import AutoModelForCausalLM

    path = folder / "hostile.sf"
    with open(path, "wb") as handle:
        handle.truncate(2**40)
    return lambda: AutoModelForCausalLM.from_spec(path)


@case("spec-fifo", mentions="not a regular file")
def _(folder: Path, valid: Path) -> Action:
    from specformer.runtime.auto import AutoModelForCausalLM

    os.mkfifo(folder / "hostile.sf")
    return lambda: AutoModelForCausalLM.from_spec(folder / "hostile.sf")


@case("spec-directory", mentions="not a regular file")
def _(folder: Path, valid: Path) -> Action:
    from specformer.runtime.auto import AutoModelForCausalLM

    (folder / "hostile.sf").mkdir()
    return lambda: AutoModelForCausalLM.from_spec(folder / "hostile.sf")


@case("spec-device-file", mentions="not a regular file")
def _(folder: Path, valid: Path) -> Action:
    from specformer.runtime.auto import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_spec("/dev/zero")


@case("spec-missing")
def _(folder: Path, valid: Path) -> Action:
    from specformer.runtime.auto import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_spec(folder / "nowhere.sf")


@case("spec-config-override-zero-heads")
def _(folder: Path, valid: Path) -> Action:
    text = (Path(__file__).parents[1] / "specs" / "llama.sf").read_text().replace("model Llama", "model L2")
    return _from_spec(folder, text.replace('"llama"', '"l2"'), {**TINY, "num_attention_heads": 0})


@case("spec-config-override-wrong-type")
def _(folder: Path, valid: Path) -> Action:
    return _from_spec(folder, tiny_spec(), {"hidden_size": "big"})


@case("spec-config-override-huge")
def _(folder: Path, valid: Path) -> Action:
    return _from_spec(folder, tiny_spec(), {"hidden_size": 10**7, "vocab_size": 10**7})


# ---- checkpoint folders: config.json ---------------------------------------------------------------
def _folder(folder: Path, valid: Path, layout: str = "single") -> Path:
    target = folder / "ckpt"
    shutil.copytree(valid / layout, target)
    return target


def _load(path: Path) -> Action:
    from specformer.runtime.auto import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(path)


def _with_config(change: Callable[[dict], object]) -> Callable[[Path, Path], Action]:
    def build(folder: Path, valid: Path) -> Action:
        target = _folder(folder, valid)
        values = json.loads((target / "config.json").read_text())
        values.pop("head_dim", None)  # derived from the heads again, as in configs that leave it out
        changed = change(values)
        (target / "config.json").write_text(json.dumps(values if changed is None else changed))
        return _load(target)

    return build


CONFIG_CHANGES: dict[str, Callable[[dict], object]] = {
    "zero-heads": lambda c: c.update(num_attention_heads=0),
    "negative-heads": lambda c: c.update(num_attention_heads=-2),
    "zero-kv-heads": lambda c: c.update(num_key_value_heads=0),
    "kv-heads-not-dividing": lambda c: c.update(num_key_value_heads=3, num_attention_heads=2),
    "hidden-not-dividing": lambda c: c.update(hidden_size=17),
    "negative-hidden": lambda c: c.update(hidden_size=-16),
    "zero-hidden": lambda c: c.update(hidden_size=0),
    "zero-vocab": lambda c: c.update(vocab_size=0),
    "negative-intermediate": lambda c: c.update(intermediate_size=-1),
    "ten-million-layers": lambda c: c.update(num_hidden_layers=10**7),
    "negative-layers": lambda c: c.update(num_hidden_layers=-1),
    "trillion-vocab": lambda c: c.update(vocab_size=10**12),
    "huge-everything": lambda c: c.update(vocab_size=10**6, hidden_size=10**6),
    "pad-id-out-of-range": lambda c: c.update(pad_token_id=1000),
    "string-for-int": lambda c: c.update(hidden_size="sixteen"),
    "float-for-int": lambda c: c.update(hidden_size=16.5),
    "bool-for-int": lambda c: c.update(num_hidden_layers=True),
    "list-for-int": lambda c: c.update(vocab_size=[96]),
    "null-for-int": lambda c: c.update(intermediate_size=None),
    "string-for-float": lambda c: c.update(rms_norm_eps="tiny"),
    "string-for-bool": lambda c: c.update(tie_word_embeddings="yes"),
    "unknown-activation": lambda c: c.update(hidden_act="sparkle"),
    "activation-not-string": lambda c: c.update(hidden_act=3),
    "rope-not-a-dict": lambda c: c.update(rope_parameters=[1, 2]),
    "rope-unknown-type": lambda c: c.update(rope_parameters={"rope_type": "spiral", "rope_theta": 1e4}),
    "rope-linear-without-factor": lambda c: c.update(
        rope_parameters={"rope_type": "linear", "rope_theta": 1e4}
    ),
    "rope-type-a-number": lambda c: c.update(rope_parameters={"rope_type": 7}),
    "rope-theta-negative": lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": -1.0}),
    "rope-factor-a-string": lambda c: c.update(rope_parameters={"rope_type": "linear", "factor": "2"}),
    "dtype-not-a-dtype": lambda c: c.update(dtype="os.system"),
    "dtype-a-number": lambda c: c.update(dtype=32),
    "model-type-unknown": lambda c: c.update(model_type="not_a_model"),
    "model-type-a-number": lambda c: c.update(model_type=7),
    "model-type-missing": lambda c: c.pop("model_type"),
    "num-labels-huge": lambda c: c.update(num_labels=10**9),
    "id2label-not-a-dict": lambda c: c.update(id2label=[1, 2]),
    "id2label-bad-keys": lambda c: c.update(id2label={"a": "x"}),
    "a-list": lambda c: [c],
    "a-number": lambda c: 42,
    "a-string": lambda c: "config",
    "empty-object": lambda c: {},
}
for _name, _change in CONFIG_CHANGES.items():
    case(f"config-{_name}")(_with_config(_change))


def _config_bytes(name: str, data: bytes, mentions: str | None = None) -> None:
    @case(f"config-{name}", mentions=mentions)
    def _(folder: Path, valid: Path) -> Action:
        target = _folder(folder, valid)
        (target / "config.json").write_bytes(data)
        return _load(target)


_config_bytes("null", b"null", mentions="config.json")
_config_bytes("not-json", b"{'model_type': 'llama'}", mentions="config.json")
_config_bytes("truncated", b'{"model_type": "llama", "hidden_size": 1', mentions="config.json")
_config_bytes("empty", b"", mentions="config.json")
_config_bytes("not-utf8", b'{"model_type": "ll\xe9ama"}', mentions="config.json")
_config_bytes("nan", b'{"model_type": "llama", "rms_norm_eps": NaN}')
_config_bytes("deep-nesting", b'{"model_type": "llama", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
_config_bytes("huge-number", b'{"model_type": "llama", "hidden_size": 1' + b"0" * 5000 + b"}")


@case("config-missing", mentions="config.json")
def _(folder: Path, valid: Path) -> Action:
    target = _folder(folder, valid)
    (target / "config.json").unlink()
    return _load(target)


@case("config-huge-sparse")
def _(folder: Path, valid: Path) -> Action:
    target = _folder(folder, valid)
    with open(target / "config.json", "r+b") as handle:
        handle.truncate(2**40)
    return _load(target)


@case("folder-missing")
def _(folder: Path, valid: Path) -> Action:
    return _load(folder / "nowhere")


@case("folder-a-file")
def _(folder: Path, valid: Path) -> Action:
    (folder / "file").write_text("x")
    return _load(folder / "file")


@case("hub-id-not-cached")
def _(folder: Path, valid: Path) -> Action:
    from specformer.runtime.auto import AutoModelForCausalLM

    os.environ["HF_HUB_OFFLINE"] = "1"  # the child's own environment
    return lambda: AutoModelForCausalLM.from_pretrained("no-such-owner/no-such-model", cache_dir=folder)


# ---- checkpoint folders: weights, indexes, save journals -------------------------------------------
def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _safetensors(header: dict | bytes, data: bytes, claimed: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if claimed is None else claimed) + text + data


def _with_weights(change: Callable[[dict, bytes], bytes]) -> Callable[[Path, Path], Action]:
    """A folder whose model.safetensors is `change(header, data)` of the valid one."""

    def build(folder: Path, valid: Path) -> Action:
        target = _folder(folder, valid)
        header, data = _header(target / "model.safetensors")
        (target / "model.safetensors").write_bytes(change(header, data))
        return _load(target)

    return build


def _tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def _retype(header: dict, dtype: str) -> dict:
    name = _tensor_names(header)[0]
    return {**header, name: {**header[name], "dtype": dtype}}


def _reshape(header: dict, shape: list[int]) -> dict:
    name = next(n for n in _tensor_names(header) if n.endswith("embed_tokens.weight"))
    return {**header, name: {**header[name], "shape": shape}}


def _offsets(header: dict, offsets: list[int]) -> dict:
    name = _tensor_names(header)[-1]
    return {**header, name: {**header[name], "data_offsets": offsets}}


def _without(header: dict, suffix: str) -> dict:
    return {k: v for k, v in header.items() if not k.endswith(suffix)}


WEIGHT_CHANGES: dict[str, Callable[[dict, bytes], bytes]] = {
    "empty": lambda h, d: b"",
    "seven-bytes": lambda h, d: b"\x00" * 7,
    "truncated-data": lambda h, d: _safetensors(h, d[: len(d) // 2]),
    "truncated-header": lambda h, d: _safetensors(h, d)[:40],
    "header-length-huge": lambda h, d: _safetensors(h, d, claimed=2**62),
    "header-length-past-end": lambda h, d: _safetensors(h, d, claimed=len(d) + 10_000),
    "header-not-json": lambda h, d: _safetensors(b"{not json", d),
    "header-a-list": lambda h, d: _safetensors(b"[1, 2, 3]", d),
    "header-not-utf8": lambda h, d: _safetensors(b'{"\xff\xfe": 1}', d),
    "unknown-dtype": lambda h, d: _safetensors(_retype(h, "Q9"), d),
    "int-dtype": lambda h, d: _safetensors(_retype(h, "I64"), d),
    "offsets-past-end": lambda h, d: _safetensors(_offsets(h, [0, len(d) + 4096]), d),
    "offsets-reversed": lambda h, d: _safetensors(_offsets(h, [64, 0]), d),
    "offsets-overlap": lambda h, d: _safetensors(
        _offsets(
            h, [0, h[_tensor_names(h)[-1]]["data_offsets"][1] - h[_tensor_names(h)[-1]]["data_offsets"][0]]
        ),
        d,
    ),
    "shape-not-matching-bytes": lambda h, d: _safetensors(_reshape(h, [96, 17]), d),
    "shape-swapped": lambda h, d: _safetensors(_reshape(h, [16, 96]), d),
    "shape-huge": lambda h, d: _safetensors(_reshape(h, [2**40, 2**40]), d),
    "shape-negative": lambda h, d: _safetensors(_reshape(h, [-96, 16]), d),
    "missing-tensor": lambda h, d: _safetensors(
        _without(h, "lm_head.weight")
        if any(k.endswith("lm_head.weight") for k in h)
        else _without(h, "norm.weight"),
        d,
    ),
    "extra-tensor": lambda h, d: _safetensors({**h, "model.evil.weight": h[_tensor_names(h)[0]]}, d),
    "only-metadata": lambda h, d: _safetensors({"__metadata__": {"format": "pt"}}, b""),
    "metadata-not-strings": lambda h, d: _safetensors({**h, "__metadata__": {"format": 1}}, d),
}
for _name, _weights in WEIGHT_CHANGES.items():
    case(f"weights-{_name}")(_with_weights(_weights))


def _folder_case(
    name: str, make: Callable[[Path], None], layout: str = "single", mentions: str | None = None
) -> None:
    @case(name, mentions=mentions)
    def _(folder: Path, valid: Path) -> Action:
        target = _folder(folder, valid, layout)
        make(target)
        return _load(target)


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _sparse(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(2**40)


def _symlink(path: Path, to: str) -> None:
    path.unlink()
    path.symlink_to(to)


_folder_case("config-a-directory", lambda t: _directory(t / "config.json"))
_folder_case("config-a-fifo", lambda t: _fifo(t / "config.json"))
_folder_case("weights-missing", lambda t: (t / "model.safetensors").unlink())
_folder_case("weights-a-fifo", lambda t: _fifo(t / "model.safetensors"))
_folder_case("weights-a-directory", lambda t: _directory(t / "model.safetensors"))
_folder_case("weights-huge-sparse", lambda t: _sparse(t / "model.safetensors"))
_folder_case("weights-symlink-to-passwd", lambda t: _symlink(t / "model.safetensors", "/etc/passwd"))
_folder_case("weights-symlink-to-dev-zero", lambda t: _symlink(t / "model.safetensors", "/dev/zero"))
_folder_case("weights-symlink-dangling", lambda t: _symlink(t / "model.safetensors", "/nowhere/x"))


def _index(target: Path, change: Callable[[dict], object]) -> None:
    index = json.loads((target / "model.safetensors.index.json").read_text())
    changed = change(index)
    (target / "model.safetensors.index.json").write_text(json.dumps(index if changed is None else changed))


def _first_shard(target: Path) -> Path:
    return (
        target
        / sorted(json.loads((target / "model.safetensors.index.json").read_text())["weight_map"].values())[0]
    )


def _remap(index: dict, value: str) -> None:
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = value


INDEX_CHANGES: dict[str, Callable[[dict], object]] = {
    "weight-map-a-list": lambda i: i.update(weight_map=[1, 2]),
    "weight-map-missing": lambda i: i.pop("weight_map"),
    "weight-map-empty": lambda i: i.update(weight_map={}),
    "weight-map-values-not-strings": lambda i: _remap(i, 7),
    "shard-parent-folder": lambda i: _remap(i, "../outside.safetensors"),
    "shard-absolute": lambda i: _remap(i, "/etc/passwd"),
    "shard-dotdot-inside": lambda i: _remap(i, "sub/../../outside.safetensors"),
    "shard-missing": lambda i: _remap(i, "model-99999-of-99999.safetensors"),
    "shard-empty-name": lambda i: _remap(i, ""),
    "shard-the-folder": lambda i: _remap(i, "."),
    "an-array": lambda i: [i],
}
for _name, _change in INDEX_CHANGES.items():
    _folder_case(f"index-{_name}", lambda t, change=_change: _index(t, change), layout="sharded")
_folder_case(
    "index-not-json",
    lambda t: (t / "model.safetensors.index.json").write_text("{"),
    layout="sharded",
    mentions="index",
)
_folder_case("index-a-fifo", lambda t: _fifo(t / "model.safetensors.index.json"), layout="sharded")
_folder_case("index-huge-sparse", lambda t: _sparse(t / "model.safetensors.index.json"), layout="sharded")
_folder_case(
    "shard-truncated",
    lambda t: _first_shard(t).write_bytes(_first_shard(t).read_bytes()[:100]),
    layout="sharded",
)
_folder_case("shard-deleted", lambda t: _first_shard(t).unlink(), layout="sharded")
_folder_case("shard-a-fifo", lambda t: _fifo(_first_shard(t)), layout="sharded")


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned > pwned.txt",))


def _legacy(target: Path, content: object | bytes) -> None:
    (target / "model.safetensors").unlink()
    if isinstance(content, bytes):
        (target / "pytorch_model.bin").write_bytes(content)
    else:
        import pickle

        (target / "pytorch_model.bin").write_bytes(pickle.dumps(content))


_folder_case("legacy-pickle-runs-code", lambda t: _legacy(t, {"x": _Evil()}))
_folder_case(
    "legacy-torch-save-runs-code",
    lambda t: torch.save({"x": _Evil()}, _legacy(t, b"") or t / "pytorch_model.bin"),
)
_folder_case("legacy-garbage", lambda t: _legacy(t, b"\x80\x04garbage"))
_folder_case(
    "legacy-a-list", lambda t: torch.save([torch.zeros(2)], _legacy(t, b"") or t / "pytorch_model.bin")
)
_folder_case("legacy-empty", lambda t: _legacy(t, b""))


def _journal(target: Path, journal: object) -> None:
    (target / ".specformer-save.json").write_text(json.dumps(journal))


JOURNALS: dict[str, object] = {
    "renames-outside": {"rename": {"../evil": ".x.staged"}, "remove": []},
    "removes-outside": {"rename": {}, "remove": ["../config.json"]},
    "removes-absolute": {"rename": {}, "remove": ["/etc/passwd"]},
    "renames-not-staged": {"rename": {"config.json": "model.safetensors"}, "remove": []},
    "not-an-object": [1, 2],
    "wrong-fields": {"rename": [], "remove": {}},
}
for _name, _journal_value in JOURNALS.items():
    _folder_case(f"journal-{_name}", lambda t, j=_journal_value: _journal(t, j), mentions="save.json")
_folder_case(
    "journal-not-json", lambda t: (t / ".specformer-save.json").write_text("{"), mentions="save.json"
)


# ---- GGUF files --------------------------------------------------------------------------------------
def _load_gguf(path: Path) -> Action:
    from specformer.runtime.auto import load_causal_lm

    return lambda: load_causal_lm(path)


def _gguf_case(name: str, change: Callable[[bytearray, object], None], mentions: str | None = None) -> None:
    """A copy of the valid GGUF with `change(bytes, reader)` applied in place."""

    @case(f"gguf-{name}", mentions=mentions)
    def _(folder: Path, valid: Path) -> Action:
        import gguf

        data = bytearray((valid / "model.gguf").read_bytes())
        change(data, gguf.GGUFReader(valid / "model.gguf"))
        (folder / "model.gguf").write_bytes(bytes(data))
        return _load_gguf(folder / "model.gguf")


def _value_at(reader: object, key: str) -> int:
    """Where the value of metadata `key` starts: after its name (u64 length + bytes) and u32 type."""
    return reader.fields[key].offset + 8 + len(key.encode()) + 4  # type: ignore[attr-defined]


def _put(fmt: str, at: int | Callable[[object], int], value: object) -> Callable[[bytearray, object], None]:
    def change(data: bytearray, reader: object) -> None:
        where = at if isinstance(at, int) else at(reader)
        struct.pack_into(fmt, data, where, value)

    return change


def _tensor_info(reader: object, index: int = 0) -> int:
    """Where tensor `index`'s n_dims field starts, after its name."""
    tensor = reader.tensors[index]  # type: ignore[attr-defined]
    return tensor.field.offset + 8 + len(tensor.name.encode())


GGUF_CHANGES: dict[str, Callable[[bytearray, object], None]] = {
    "bad-magic": _put("4s", 0, b"GGML"),
    "version-1": _put("<I", 4, 1),
    "version-99": _put("<I", 4, 99),
    "tensor-count-huge": _put("<Q", 8, 2**60),
    "kv-count-huge": _put("<Q", 16, 2**60),
    "tensor-count-one-more": lambda d, r: struct.pack_into("<Q", d, 8, len(r.tensors) + 1),
    "kv-count-one-more": lambda d, r: struct.pack_into("<Q", d, 16, len(r.fields) - 2),
    "key-length-lies": _put("<Q", lambda r: r.fields["llama.block_count"].offset, 2**40),
    "string-length-lies": _put("<Q", lambda r: _value_at(r, "general.architecture"), 2**40),
    "value-type-unknown": _put("<I", lambda r: _value_at(r, "llama.block_count") - 4, 77),
    "block-count-huge": _put("<I", lambda r: _value_at(r, "llama.block_count"), 10**7),
    "block-count-zero": _put("<I", lambda r: _value_at(r, "llama.block_count"), 0),
    "head-count-zero": _put("<I", lambda r: _value_at(r, "llama.attention.head_count"), 0),
    "kv-heads-not-dividing": _put("<I", lambda r: _value_at(r, "llama.attention.head_count_kv"), 3),
    "embedding-length-zero": _put("<I", lambda r: _value_at(r, "llama.embedding_length"), 0),
    "embedding-length-huge": _put("<I", lambda r: _value_at(r, "llama.embedding_length"), 2**31),
    "context-length-zero": _put("<I", lambda r: _value_at(r, "llama.context_length"), 0),
    "rope-base-negative": _put("<f", lambda r: _value_at(r, "llama.rope.freq_base"), -1.0),
    "rms-eps-nan": _put("<f", lambda r: _value_at(r, "llama.attention.layer_norm_rms_epsilon"), float("nan")),
    "architecture-unknown": lambda d, r: d.__setitem__(
        slice(_value_at(r, "general.architecture") + 8, _value_at(r, "general.architecture") + 13), b"evil!"
    ),
    "token-array-length-lies": _put("<Q", lambda r: _value_at(r, "tokenizer.ggml.tokens") + 4, 2**50),
    "token-array-type-unknown": _put("<I", lambda r: _value_at(r, "tokenizer.ggml.tokens"), 99),
    "bos-id-out-of-vocab": _put("<I", lambda r: _value_at(r, "tokenizer.ggml.bos_token_id"), 10**6),
    "tensor-dims-huge": _put("<Q", lambda r: _tensor_info(r) + 4, 2**40),
    "tensor-n-dims-huge": _put("<I", lambda r: _tensor_info(r), 2**20),
    "tensor-type-unknown": lambda d, r: struct.pack_into(
        "<I", d, _tensor_info(r) + 4 + 8 * len(r.tensors[0].shape), 99
    ),
    "tensor-offset-past-end": lambda d, r: struct.pack_into(
        "<Q", d, _tensor_info(r) + 8 + 8 * len(r.tensors[0].shape), 2**40
    ),
    "tensor-offset-unaligned": lambda d, r: struct.pack_into(
        "<Q", d, _tensor_info(r) + 8 + 8 * len(r.tensors[0].shape), 3
    ),
    "tensor-renamed": lambda d, r: d.__setitem__(
        slice(r.tensors[0].field.offset + 8, r.tensors[0].field.offset + 13), b"evil."
    ),
    "truncated-in-header": lambda d, r: d.__delitem__(slice(20, None)),
    "truncated-in-metadata": lambda d, r: d.__delitem__(slice(600, None)),
    "truncated-in-tensor-infos": lambda d, r: d.__delitem__(slice(_tensor_info(r, 2), None)),
    "truncated-in-data": lambda d, r: d.__delitem__(slice(len(d) - 100, None)),
    "empty": lambda d, r: d.clear(),
}
for _name, _change in GGUF_CHANGES.items():
    _gguf_case(_name, _change)


@case("gguf-a-directory")
def _(folder: Path, valid: Path) -> Action:
    (folder / "model.gguf").mkdir()
    return _load_gguf(folder / "model.gguf")


@case("gguf-a-fifo")
def _(folder: Path, valid: Path) -> Action:
    os.mkfifo(folder / "model.gguf")
    return _load_gguf(folder / "model.gguf")


@case("gguf-missing")
def _(folder: Path, valid: Path) -> Action:
    return _load_gguf(folder / "model.gguf")


# ---- tokenizers and chat templates -----------------------------------------------------------------
def _tokenizer_folder(folder: Path, valid: Path) -> Path:
    target = folder / "tok"
    shutil.copytree(valid / "tokenizer", target)
    return target


def _load_tokenizer(path: Path) -> Action:
    from specformer.runtime.tokenizer import AutoTokenizer

    return lambda: AutoTokenizer.from_pretrained(path)


def _tokenizer_case(name: str, change: Callable[[Path], None], mentions: str | None = None) -> None:
    @case(f"tokenizer-{name}", mentions=mentions)
    def _(folder: Path, valid: Path) -> Action:
        target = _tokenizer_folder(folder, valid)
        change(target)
        return _load_tokenizer(target)


def _tokenizer_json(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(target: Path) -> None:
        data = json.loads((target / "tokenizer.json").read_text())
        changed = change(data)
        (target / "tokenizer.json").write_text(json.dumps(data if changed is None else changed))

    return apply


def _settings(values: dict) -> Callable[[Path], None]:
    def apply(target: Path) -> None:
        settings = json.loads((target / "tokenizer_config.json").read_text())
        (target / "tokenizer_config.json").write_text(json.dumps({**settings, **values}))

    return apply


_tokenizer_case(
    "json-truncated",
    lambda t: (t / "tokenizer.json").write_text((t / "tokenizer.json").read_text()[:500]),
    mentions="tokenizer.json",
)
_tokenizer_case("json-a-list", lambda t: (t / "tokenizer.json").write_text("[]"), mentions="tokenizer.json")
_tokenizer_case("json-empty", lambda t: (t / "tokenizer.json").write_bytes(b""), mentions="tokenizer.json")
_tokenizer_case(
    "json-not-utf8", lambda t: (t / "tokenizer.json").write_bytes(b'{"\xff": 1}'), mentions="tokenizer.json"
)
_tokenizer_case("json-missing", lambda t: (t / "tokenizer.json").unlink(), mentions="tokenizer.json")
_tokenizer_case("json-a-fifo", lambda t: _fifo(t / "tokenizer.json"))
_tokenizer_case("json-huge-sparse", lambda t: _sparse(t / "tokenizer.json"))
_tokenizer_case("json-unknown-model", _tokenizer_json(lambda d: d["model"].update(type="Quantum")))
_tokenizer_case("json-model-null", _tokenizer_json(lambda d: d.update(model=None)))
_tokenizer_case("json-vocab-a-list", _tokenizer_json(lambda d: d["model"].update(vocab=[1, 2])))
_tokenizer_case("json-merges-garbage", _tokenizer_json(lambda d: d["model"].update(merges=[[1, 2, 3]])))
_tokenizer_case("json-added-token-garbage", _tokenizer_json(lambda d: d.update(added_tokens=[{"id": "x"}])))
_tokenizer_case(
    "config-not-json",
    lambda t: (t / "tokenizer_config.json").write_text("{"),
    mentions="tokenizer_config.json",
)
_tokenizer_case(
    "config-a-list",
    lambda t: (t / "tokenizer_config.json").write_text("[]"),
    mentions="tokenizer_config.json",
)
_tokenizer_case("config-template-a-number", _settings({"chat_template": 7}), mentions="chat_template")
_tokenizer_case("config-padding-side-up", _settings({"padding_side": "up"}), mentions="padding_side")
_tokenizer_case("config-bos-a-number", _settings({"bos_token": 7}))
_tokenizer_case(
    "template-file-not-utf8",
    lambda t: (t / "chat_template.jinja").write_bytes(b"{{ \xff }}"),
    mentions="chat_template.jinja",
)


def _chat(template: str, messages: object = None) -> Callable[[Path, Path], Action]:
    def build(folder: Path, valid: Path) -> Action:
        target = _tokenizer_folder(folder, valid)
        (target / "chat_template.jinja").write_text(template)
        from specformer.runtime.tokenizer import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(target)
        chat = [{"role": "user", "content": "hi"}] if messages is None else messages
        return lambda: tokenizer.apply_chat_template(chat, add_generation_prompt=True)

    return build


TEMPLATES: dict[str, str] = {
    "syntax-error": "{% for m in messages %}{{ m['content'] }",
    "raises": "{{ raise_exception('no system messages allowed') }}",
    "nested-loops": "{% for a in range(10000) %}{% for b in range(10000) %}{{ a }}{% endfor %}{% endfor %}",
    "huge-output": "{{ 'x' * 10 ** 9 }}",
    "huge-range": "{% for i in range(10 ** 12) %}{% endfor %}",
    "repeat-filter": "{{ messages[0]['content'] * 100000000 }}",
    "recursive-macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "dunder-class": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "dunder-globals": "{{ raise_exception.__globals__ }}",
    "cycler-internals": "{{ cycler.__init__.__globals__.os.system('echo pwned') }}",
    "undefined-call": "{{ nothing() }}",
    "attribute-of-undefined": "{{ nothing.at.all }}",
    "divide-by-zero": "{{ 1 // 0 }}",
    "format-string-attack": "{{ '{0.__class__}'.format(messages) }}",
    "import-statement": "{% import 'os' as os %}",
    "include": "{% include '/etc/passwd' %}",
}
for _name, _template in TEMPLATES.items():
    case(f"template-{_name}")(_chat(_template))
case("template-messages-not-a-list")(
    _chat("{% for m in messages %}{{ m['content'] }}{% endfor %}", messages=7)
)
case("template-message-missing-content")(
    _chat("{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}", messages=[{"role": "user"}])
)


@case("tokenizer-no-template")
def _(folder: Path, valid: Path) -> Action:
    target = _tokenizer_folder(folder, valid)
    _settings({"chat_template": None})(target)
    from specformer.runtime.tokenizer import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    return lambda: tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


# ---- generation arguments ----------------------------------------------------------------------------
def _generate(settings: dict, ids: object = None, mask: object = None) -> Callable[[Path, Path], Action]:
    def build(folder: Path, valid: Path) -> Action:
        from specformer.generated.llama import LlamaForCausalLM
        from specformer.runtime.generation import generate

        model = LlamaForCausalLM.from_pretrained(valid / "single")
        prompt = torch.tensor([[1, 2, 3]]) if ids is None else ids
        return lambda: generate(model, prompt, mask, **settings)

    return build


GENERATION: dict[str, tuple[dict, object, object]] = {
    "max-new-tokens-negative": ({"max_new_tokens": -1}, None, None),
    "num-beams-zero": ({"num_beams": 0}, None, None),
    "temperature-zero-sampling": ({"do_sample": True, "temperature": 0.0}, None, None),
    "top-p-above-one": ({"do_sample": True, "top_p": 2.0}, None, None),
    "repetition-penalty-zero": ({"repetition_penalty": 0.0}, None, None),
    "unknown-setting": ({"max_new_tokenz": 4}, None, None),
    "unknown-cache": ({"cache_implementation": "magic"}, None, None),
    "compile-what": ({"compile": "please"}, None, None),
    "ids-one-dimensional": ({}, torch.tensor([1, 2, 3]), None),
    "ids-float": ({}, torch.tensor([[1.0, 2.0]]), None),
    "ids-past-vocab": ({}, torch.tensor([[1, 2, 10**6]]), None),
    "ids-negative": ({}, torch.tensor([[1, -7]]), None),
    "ids-empty": ({}, torch.zeros((1, 0), dtype=torch.long), None),
    "mask-wrong-shape": ({}, None, torch.ones((1, 7), dtype=torch.long)),
}
for _name, (_settings_value, _ids, _mask) in GENERATION.items():
    case(f"generate-{_name}")(_generate(_settings_value, _ids, _mask))
