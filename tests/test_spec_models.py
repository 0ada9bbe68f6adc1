"""Architectures that travel as specs: loading one that is not installed, and the limits that make it safe."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from specformer.codegen import render_model
from specformer.dsl import SpecError, SpecSet
from specformer.generated.gemma import GemmaConfig, GemmaForCausalLM
from specformer.runtime import AutoModelForCausalLM, auto
from specformer.runtime.errors import ConfigError
from specformer.runtime.spec_models import UnsafeSourceError, build_package, check_generated_source

SPECS = Path(__file__).resolve().parents[1] / "specs"
GEMMA = (SPECS / "gemma.sf").read_text()
LLAMA = (SPECS / "llama.sf").read_text()


def tiny_gemma() -> GemmaForCausalLM:
    torch.manual_seed(0)
    config = GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)  # fmt: skip
    return GemmaForCausalLM(config).eval()


def test_a_folder_with_its_spec_loads_an_architecture_that_is_not_installed(
    tmp_path: Path, monkeypatch
) -> None:
    model = tiny_gemma()
    model.save_pretrained(tmp_path)
    for extra in ("generation_config.json",):
        (tmp_path / extra).unlink()
    (tmp_path / "model.sf").write_text(GEMMA)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "model.sf"]
    installed = dict(auto.generated_packages())
    del installed["gemma"]  # as if Gemma were not one of the generated packages
    monkeypatch.setattr(auto, "generated_packages", lambda: installed)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded).__module__.startswith("specformer_spec_gemma_")  # built from the folder's spec
    assert type(loaded) is not GemmaForCausalLM
    ids = torch.tensor([[5, 9, 2, 33, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    again = tmp_path / "again"
    loaded.save_pretrained(again)  # the spec travels on
    assert (again / "model.sf").read_text() == GEMMA and (again / "llama.sf").read_text() == LLAMA


def test_from_spec_without_a_checkpoint(tmp_path: Path) -> None:
    spec = tmp_path / "tinyformer.sf"
    spec.write_text(GEMMA.replace("model Gemma", "model Tinyformer").replace('"gemma"', '"tinyformer"'))
    model = AutoModelForCausalLM.from_spec(spec, {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                                                  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})  # fmt: skip
    assert type(model).__name__ == "TinyformerForCausalLM"
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)
    with pytest.raises(ConfigError, match=r"tinyformer.sf: .* has [\d,]+ parameters, over the limit"):
        AutoModelForCausalLM.from_spec(
            spec, {"hidden_size": 65536, "intermediate_size": 1048576, "num_hidden_layers": 400}
        )


HOSTILE = {
    "code in a string": (
        'model H extends Llama { model_type = "h\\"); import os; (\\"" }',
        "unexpected character",
    ),
    "dunder name": (
        'model H extends Llama { model_type = "h"  config { __class__: int = 1 } }',
        "may not start with an underscore",
    ),
    "dunder submodule": (
        'model H extends Llama { model_type = "h"  MLP.__dict__ = Linear(1, 2) }',
        "may not start with an underscore",
    ),
    "huge repeat": (
        'model H extends Llama { model_type = "h"  Model.layers = repeat(10 ** 12, DecoderLayer) }',
        "repeat count",
    ),
    "huge default": (
        'model H extends Llama { model_type = "h"  config { num_hidden_layers = 99999999 } }',
        "repeat count",
    ),
    "deep extends": (
        "\n".join(
            f'model M{i} extends {"Llama" if i == 0 else f"M{i - 1}"} {{ model_type = "m{i}" }}'
            for i in range(40)
        ),
        "chain deeper than",
    ),
    "extends cycle": (
        'model A extends B { model_type = "a" }\nmodel B extends A { model_type = "b" }',
        "cycle in `extends`",
    ),
    "block recursion": (
        'model H extends Llama { model_type = "h"  MLP.again = MLP }',
        "blocks contain each other",
    ),
    "enormous expression": (
        'model H extends Llama { model_type = "h"  config { hidden_size = '
        + "+".join(["1"] * 30000)
        + " } }",
        "nested too deeply",
    ),
    "attribute access": (
        'model H extends Llama { model_type = "h"  MLP.forward(x) { return x.__class__ } }',
        "unexpected",
    ),
    "an import": ('model H extends Llama { model_type = "h" }\nimport os', "unexpected"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_specs_fail_before_any_code_runs(case: str) -> None:
    text, message = HOSTILE[case]
    before = {m for m in sys.modules if m.startswith("specformer_spec_")}
    with pytest.raises(SpecError, match=message):
        build_package({"hostile.sf": text}, name=re.findall(r"model (\w+)", text)[-1])
    assert {m for m in sys.modules if m.startswith("specformer_spec_")} == before  # nothing was executed


@pytest.mark.parametrize(
    ("source", "refused"),
    [
        ("import os\n", "import of `os`"),
        ("from subprocess import run\n", "import from `subprocess`"),
        ("x = eval('1')\n", "name `eval`"),
        ("x = open('f')\n", "name `open`"),
        ("x = (1).__class__\n", "attribute `__class__`"),
        ("x = f'{1}'\n", "`JoinedStr`"),
        ("f = lambda: 1\n", "`Lambda`"),
        ("with x:\n    pass\n", "`With`"),
        ("while True:\n    pass\n", "`While`"),
        ("x = __builtins__\n", "name `__builtins__`"),
        ("x = torch.load('w.pt', weights_only=False)\n", "`torch.load` is not"),
        ("torch.serialization.os.system('x')\n", "`torch.serialization.os.system` is not"),
        (
            "torch.utils.cpp_extension.load_inline('m', '')\n",
            "`torch.utils.cpp_extension.load_inline` is not",
        ),
        ("torch.ops.load_library('x.so')\n", "`torch.ops.load_library` is not"),
        ("x = torch.Tensor.new\n", "`torch.Tensor.new` is not"),
    ],
)
def test_the_source_check_refuses_what_the_generator_never_emits(source: str, refused: str) -> None:
    with pytest.raises(UnsafeSourceError, match=re.escape(refused)):
        check_generated_source(source, "m.py")


def test_every_generated_package_passes_the_source_check() -> None:
    for path in (SPECS.parent / "generated").rglob("*.py"):
        check_generated_source(path.read_text(), str(path))


_ALPHABET = st.sampled_from(
    [*list('abcdefghijklmnopqrstuvwxyz_0123456789 (){}=:,.+-*/\n"#'), "Linear", "repeat", "x", "none"]
)


@given(st.data())
def test_any_spec_that_validates_generates_source_the_check_accepts(data: st.DataObject) -> None:
    """Random edits of a real spec: if the edit still validates, the code generated from it passes the
    source check, so `build_package` never reaches `exec` with anything the check would refuse."""
    start = data.draw(st.integers(0, len(GEMMA) - 1))
    end = data.draw(st.integers(start, min(len(GEMMA), start + 30)))
    edit = "".join(data.draw(st.lists(_ALPHABET, max_size=8)))
    specs = SpecSet()
    specs.add_text(LLAMA, "llama.sf")
    try:
        specs.add_text(GEMMA[:start] + edit + GEMMA[end:], "gemma.sf")
        resolved = specs.resolved("Gemma")
    except SpecError:
        return
    for rel, source in render_model(resolved).items():
        check_generated_source(source, rel)


def test_a_hub_repo_carrying_its_spec_loads_offline(tmp_path: Path, monkeypatch) -> None:
    from test_loading import hub_cache

    spec = tmp_path / "hubformer.sf"
    spec.write_text(GEMMA.replace("model Gemma", "model Hubformer").replace('"gemma"', '"hubformer"'))
    small = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}  # fmt: skip
    model = AutoModelForCausalLM.from_spec(spec, small).eval()
    model.save_pretrained(tmp_path / "saved")
    hub_cache(tmp_path / "cache", "acme/hubformer", tmp_path / "saved")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = AutoModelForCausalLM.from_pretrained("acme/hubformer", cache_dir=tmp_path / "cache")
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_a_folder_spec_cannot_replace_an_installed_one(tmp_path: Path) -> None:
    sources = {
        "model.sf": GEMMA.replace("model Gemma", "model Replacer"),
        "llama.sf": LLAMA.replace("vocab_size: int = 32000", "vocab_size: int = 7"),  # another Llama
    }
    with pytest.raises(
        SpecError, match=r"declares model `Llama`, which the installed spec llama\.sf declares"
    ):
        build_package(sources, name="Replacer")
    sources["llama.sf"] = LLAMA  # an exact copy, as save_pretrained writes it, is fine
    assert build_package(sources, name="Replacer").__name__.startswith("specformer_spec_replacer_")
