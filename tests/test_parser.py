"""The spec language rejects bad input with `SpecError` at a line and column, and nothing else."""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from specformer.dsl import SpecError, SpecSet, parse

SPECS = Path(__file__).resolve().parents[1] / "specs"
LLAMA = (SPECS / "llama.sf").read_text()

MINIMAL = """
model Tiny {
  config {
    vocab_size: int = 10
    hidden_size: int = 8
  }
  backbone Model as model {
    embed_tokens = Embedding(vocab_size, hidden_size)
    forward(input_ids) { return embed_tokens(input_ids) }
  }
}
"""


def resolve(text: str, file: str = "t.sf", *extra: tuple[str, str]) -> None:
    specs = SpecSet()
    for other_text, other_file in extra:
        specs.add_text(other_text, other_file)
    names = specs.add_text(text, file)
    for name in names:
        specs.resolved(name)


def error_of(text: str, *extra: tuple[str, str]) -> SpecError:
    with pytest.raises(SpecError) as info:
        resolve(text, "t.sf", *extra)
    return info.value


def test_minimal_spec_is_valid() -> None:
    resolve(MINIMAL)


def test_seed_specs_are_valid() -> None:
    specs = SpecSet()
    for path in sorted(SPECS.glob("*.sf")):
        specs.add_file(path)
    assert {m.name for m in specs.all_resolved()} >= {"Llama", "Gemma"}


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        ("model X { config { a: int = 1 + } }", 1, 33, "unexpected `}`"),
        ("model X {\n  config {\n    a: int = 1\n", 3, 15, "unexpected end of file"),
        ("model X { block B { x = Linear('a') } }", 1, 32, "double quotes"),
        ("model X { block __init__ { } }", 1, 17, "underscore"),
        ("model X { config { class: int = 1 } }", 1, 20, "Python keyword"),
        ("model X { config { self: int = 1 } }", 1, 20, "reserved"),
        ('model X { model_type = "a\\"b" }', 1, 24, "unexpected character"),
        ("model X { config { a: int = 1 } } model X { }", 1, 41, "already declared"),
    ],
)
def test_syntax_errors_point_at_the_problem(text: str, line: int, column: int, message: str) -> None:
    err = error_of(text)
    assert (err.line, err.column) == (line, column), str(err)
    assert message in str(err)
    assert f"t.sf:{line}:{column}: error:" in str(err)
    assert "^" in str(err)  # the caret under the source line


def test_misspelt_field_gets_a_suggestion() -> None:
    text = MINIMAL.replace("Embedding(vocab_size, hidden_size)", "Embedding(vocab_size, hiden_size)")
    err = error_of(text)
    assert "unknown field `hiden_size`" in str(err)
    assert str(err).splitlines()[0].endswith("did you mean `hidden_size`?")
    assert (err.line, err.column) == (8, 42)


def test_unknown_primitive_gets_a_suggestion() -> None:
    err = error_of(MINIMAL.replace("Embedding(", "Embeding("))
    assert "unknown primitive `Embeding`; did you mean `Embedding`?" in str(err)


def test_unknown_primitive_parameter() -> None:
    err = error_of(MINIMAL.replace("hidden_size)\n", "hidden_size, paddin_idx = 0)\n"))
    assert "has no parameter `paddin_idx`; did you mean `padding_idx`?" in str(err)


def test_type_mismatch_in_default() -> None:
    err = error_of(MINIMAL.replace("hidden_size: int = 8", "hidden_size: int = 8.5"))
    assert "not of type `int`" in str(err)
    assert err.line == 5


def test_default_dividing_by_zero() -> None:
    text = MINIMAL.replace(
        "hidden_size: int = 8", "hidden_size: int = 8\n    heads: int = 0\n    d: int = hidden_size // heads"
    )
    err = error_of(text)
    assert "division by zero" in str(err)
    assert err.line == 7


def test_cyclic_defaults() -> None:
    text = MINIMAL.replace("hidden_size: int = 8", "hidden_size: int = width\n    width: int = hidden_size")
    assert "depend on each other" in str(error_of(text))


def test_cycle_in_extends() -> None:
    a = "model A extends B { }"
    b = "model B extends A { }"
    err = error_of(a, (b, "b.sf"))
    assert "cycle in `extends`" in str(err)
    assert err.pos is not None and err.pos.file in ("t.sf", "b.sf")


def test_extends_unknown_model_suggests() -> None:
    err = error_of("model Mine extends Lama { }", (LLAMA, "llama.sf"))
    assert "extends unknown model `Lama`; did you mean `Llama`?" in str(err)
    assert (err.line, err.column) == (1, 20)


def test_unknown_name_in_forward() -> None:
    text = MINIMAL.replace("return embed_tokens(input_ids)", "return embed_tokens(input_id)")
    assert "unknown name `input_id`; did you mean `input_ids`?" in str(error_of(text))


def test_removed_field_still_used_is_reported_where_used() -> None:
    err = error_of("model Mine extends Llama { config { remove mlp_bias } }", (LLAMA, "llama.sf"))
    assert "unknown field `mlp_bias`" in str(err)
    assert err.pos is not None and err.pos.file == "llama.sf"


def test_block_cycle() -> None:
    text = MINIMAL.replace(
        "  backbone Model",
        "  block A { b = B  forward(x) { return b(x) } }\n  block B { a = A  forward(x) { return a(x) } }\n"
        "  backbone Model",
    )
    assert "contain each other" in str(error_of(text))


def test_huge_repeat_is_rejected() -> None:
    text = MINIMAL.replace(
        "    embed_tokens = Embedding(vocab_size, hidden_size)\n",
        "    embed_tokens = Embedding(vocab_size, hidden_size)\n    layers = repeat(10 ** 9, L)\n",
    ).replace(
        "  backbone Model",
        "  block L { n = RMSNorm(hidden_size)  forward(x) { return n(x) } }\n  backbone Model",
    )
    assert "repeat count" in str(error_of(text))


@pytest.mark.parametrize(
    "injection",
    [
        'model X { model_type = "a\\"); import os; ("" }',
        "model X { config { a: int = __import__ } }",
        "model X { config { a: int = 1 } backbone M as m { e = Embedding(a, a) forward(input_ids) { return os.system(input_ids) } } }",
        "model X { config { a: int = 1 } backbone M as m { e = Embedding(a, a) forward(input_ids) { return eval(input_ids) } } }",
        'model X { config { a: str = "\n" } }',
        'model X { config { a: str = "\rimport os\r" } }',
        'model X { model_type = "x y" }',
        "model X { config { a: int = 1 } backbone M as m { e = Embedding(a, a) forward(input_ids) { return e(input_ids).__class__ } } }",
        "model X { config { a: int = 1 } backbone M as m { e = Embedding(a, a) forward(input_ids) { exec = e(input_ids) return exec } } }",
    ],
)
def test_injection_attempts_are_rejected(injection: str) -> None:
    error_of(injection)


_ALPHABET = string.ascii_letters + string.digits + " \n{}()[]=:,.+-*/<>!?#\"'_"


@given(st.text(alphabet=_ALPHABET, max_size=200))
def test_arbitrary_text_raises_only_spec_errors(text: str) -> None:
    try:
        resolve(text)
    except SpecError as err:
        assert err.pos is not None, str(err)
        assert err.line >= 1 and err.column >= 1


@given(st.data())
def test_mutated_llama_spec_raises_only_spec_errors(data: st.DataObject) -> None:
    """Delete, duplicate or replace a slice of a real spec: either it is still valid or a SpecError."""
    start = data.draw(st.integers(0, len(LLAMA) - 1))
    end = data.draw(st.integers(start, min(len(LLAMA), start + 40)))
    replacement = data.draw(st.text(alphabet=_ALPHABET, max_size=12))
    mutated = LLAMA[:start] + replacement + LLAMA[end:]
    try:
        resolve(mutated, "llama.sf")
    except SpecError as err:
        assert err.pos is not None, str(err)
        assert re.match(r"llama\.sf:\d+:\d+: error: ", str(err)), str(err)


def test_parse_is_pure() -> None:
    first, second = parse(LLAMA, "a.sf"), parse(LLAMA, "a.sf")
    assert first == second


GEMMA = (SPECS / "gemma.sf").read_text()


@given(st.data())
def test_mutated_delta_spec_raises_only_spec_errors(data: st.DataObject) -> None:
    """The same for a delta full of argument overrides and `let`s (Gemma over Llama)."""
    start = data.draw(st.integers(0, len(GEMMA) - 1))
    end = data.draw(st.integers(start, min(len(GEMMA), start + 40)))
    replacement = data.draw(st.text(alphabet=_ALPHABET, max_size=12))
    try:
        resolve(GEMMA[:start] + replacement + GEMMA[end:], "gemma.sf", (LLAMA, "llama.sf"))
    except SpecError as err:
        assert re.match(r"gemma\.sf:\d+:\d+: error: ", str(err)), str(err)


@given(
    block=st.sampled_from(["Attention", "MLP", "DecoderLayer", "Model", "ForCausalLM", "Nowhere"]),
    pattern=st.sampled_from(
        ["q_proj", "*_proj", "[qk]_proj", "*", "*norm", "attend", "rotary", "embed_tokens"]
    ),
    argument=st.sampled_from(
        ["bias", "eps", "unit_offset", "causal", "window", "scale", "padding_idx", "size"]
    ),
    value=st.sampled_from(["true", "false", "none", "1e-5", "hidden_size ** 0.5", "not attention_bias", "x"]),
)
def test_argument_overrides_generate_python_or_fail_at_their_line(
    block: str, pattern: str, argument: str, value: str
) -> None:
    from specformer.codegen import render_model

    text = f"model Over extends Llama {{\n  {block}.{pattern}.{argument} = {value}\n}}\n"
    specs = SpecSet()
    specs.add_text(LLAMA, "llama.sf")
    specs.add_text(text, "over.sf")
    try:
        files = render_model(specs.resolved("Over"))
    except SpecError as err:
        assert re.match(r"(over|llama)\.sf:\d+:\d+: error: ", str(err)), str(err)
        return
    for rel, source in files.items():
        compile(source, rel, "exec")


@pytest.mark.parametrize(
    ("default", "message"),
    [
        ("2 ** 2 ** 40", "is larger than a config value can be"),
        ("[[[i for i in range(1024)] for j in range(1024)] for k in range(1024)]", "steps to evaluate"),
        ("[0] * 10 ** 9", "more than 100,000 items"),
        ("(2 ** 4000) * (2 ** 4000)", "more than 4096 bits"),
    ],
)
def test_config_expressions_are_bounded_in_steps_and_size(default: str, message: str) -> None:
    """Refused by counting (steps, bits, items) before the work is done, not by a timeout."""
    text = MINIMAL.replace("hidden_size: int = 8", f"hidden_size: int = 8\n    huge: any = {default}")
    with pytest.raises(SpecError, match=message) as err:
        resolve(text)
    assert err.value.line == 6


def test_spec_files_are_read_only_when_regular_small_and_utf8(tmp_path: Path) -> None:
    import os

    from specformer.dsl.loader import MAX_SPEC_BYTES

    fifo = tmp_path / "fifo.sf"
    os.mkfifo(fifo)
    big = tmp_path / "big.sf"
    with open(big, "wb") as handle:  # sparse: huge on paper, nothing on disk
        handle.truncate(MAX_SPEC_BYTES * 100)
    latin = tmp_path / "latin.sf"
    latin.write_bytes(MINIMAL.replace("Tiny", "Tin\xe9").encode("latin-1"))
    (tmp_path / "folder.sf").mkdir()
    cases = {
        fifo: "not a regular file",
        tmp_path / "folder.sf": "not a regular file",
        big: "the limit is",
        latin: r"latin.sf:2:10: error: byte 0xe9 is not UTF-8",
        tmp_path / "missing.sf": "not a regular file",
    }
    for path, message in cases.items():
        with pytest.raises(SpecError, match=message):
            SpecSet().add_file(path, path.name)


def test_a_size_the_default_config_makes_negative_is_refused() -> None:
    text = MINIMAL.replace(
        "embed_tokens = Embedding(vocab_size, hidden_size)",
        "embed_tokens = Embedding(vocab_size, hidden_size - 9)",
    )
    with pytest.raises(SpecError, match=r"`embedding_dim` of `embed_tokens` is -1 for the default config"):
        resolve(text)


def test_a_removed_field_declared_again_in_the_same_block_is_the_new_field() -> None:
    """`remove x` then `x: T = ...` replaces the inherited field (its type and default); declaring then
    removing removes it."""
    text = "model Again extends Llama {\n  config {\n    remove rms_norm_eps\n    rms_norm_eps: any = 1e-5\n  }\n}\n"
    specs = SpecSet()
    specs.add_text(LLAMA, "llama.sf")
    specs.add_text(text, "again.sf")
    field = next(f for f in specs.resolved("Again").config.fields if f.name == "rms_norm_eps")
    assert field.type.name == "any"
    assert field.pos.line == 4
