"""Spec fuzzing through the whole pipeline a stranger's spec goes through: parse, resolve, validate,
generate, check the generated source, import it, and build the model on the meta device from the spec's
default config. Any exception other than the library's own errors fails. CI draws a sample; `pytest
--slow tests/test_fuzz.py` runs the 10,000-example campaign.

Mutations work on tokens of the shipped specs (a name swapped for another name of the same spec, a number
for an extreme one, a token deleted or repeated, a line dropped or doubled) so most mutants parse and the
fuzz reaches the validator and the generator, not only the grammar.
"""

from __future__ import annotations

import re
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specformer.dsl import SpecError
from specformer.dsl.errors import SpecformerError
from specformer.runtime import spec_models
from specformer.runtime.meta import meta_init

INSTALLED = spec_models.installed_specs()
# Each shipped spec under another model name, so a mutant never clashes with the installed original.
SPECS = {
    f"fuzz_{file}": re.sub(r"\bmodel (\w+)", r"model Fuzz\1", text, count=1)
    for file, text in INSTALLED.items()
}
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|\d+(?:\.\d+)?(?:e-?\d+)?|\"[^\"\n]*\"|\s+|.")
EXTREMES = [
    "0",
    "-1",
    "1",
    "2",
    "3",
    "7",
    "1e-30",
    "1e30",
    "10 ** 9",
    "2 ** 64",
    "-4096",
    '""',
    '"x"',
    "true",
]
KEYWORDS = [
    "model",
    "extends",
    "config",
    "block",
    "forward",
    "return",
    "let",
    "remove",
    "repeat",
    "if",
    "else",
]


@st.composite
def mutated_spec(draw: st.DrawFn) -> tuple[str, str]:
    """(file name, mutated text) of a shipped spec."""
    file = draw(st.sampled_from(sorted(SPECS)))
    tokens = _TOKEN.findall(SPECS[file])
    words = sorted({t for t in tokens if t[0].isalpha() or t[0] == "_"})
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["name", "extreme", "keyword", "delete", "repeat", "line"]))
        at = draw(st.integers(0, len(tokens) - 1))
        if kind == "name":
            tokens[at] = draw(st.sampled_from(words))
        elif kind == "extreme":
            tokens[at] = draw(st.sampled_from(EXTREMES))
        elif kind == "keyword":
            tokens[at] = draw(st.sampled_from(KEYWORDS))
        elif kind == "delete":
            del tokens[at]
        elif kind == "repeat":
            tokens.insert(at, tokens[at])
        else:
            lines = "".join(tokens).split("\n")
            row = at % len(lines)
            lines[row : row + 1] = [] if draw(st.booleans()) else [lines[row]] * 2
            tokens = _TOKEN.findall("\n".join(lines))
    return file, "".join(tokens)


def open_spec(file: str, text: str) -> None:
    """What opening a stranger's spec does: everything up to a model built from its defaults."""
    package = spec_models.build_package({file: text}, name=None)
    try:
        for name in package.__all__:
            cls = getattr(package, name)
            if (
                name.endswith("Config")
                or not hasattr(cls, "config_class")
                or name.endswith("PreTrainedModel")
            ):
                continue
            config = cls.config_class.from_dict({})  # a required field without a value: ConfigError
            spec_models.check_size(cls, config)
            with meta_init():
                cls(config)
    finally:  # the campaign builds thousands of packages: keep none of them
        spec_models._PACKAGES.clear()
        for module in [m for m in sys.modules if m.startswith("specformer_spec_")]:
            del sys.modules[module]


def test_the_shipped_specs_open() -> None:
    for file, text in SPECS.items():
        if "extends" not in text:  # a delta is opened with its base from the installed specs
            open_spec(file, text)


def test_mutated_specs_raise_only_library_errors(fuzz_examples: int) -> None:
    outcomes: dict[str, int] = {}

    @settings(max_examples=fuzz_examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(mutated_spec())
    def campaign(case: tuple[str, str]) -> None:
        file, text = case
        try:
            open_spec(file, text)
        except SpecformerError as err:
            kind = type(err).__name__
            if isinstance(err, SpecError) and err.pos is not None:  # the file opened, or a base it extends
                assert err.pos.file in SPECS or err.pos.file in INSTALLED, str(err)
        else:
            kind = "opened"
        outcomes[kind] = outcomes.get(kind, 0) + 1

    campaign()
    print(f"\n{fuzz_examples} mutated specs: {outcomes}")
    assert sum(outcomes.values()) >= fuzz_examples
