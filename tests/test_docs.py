"""Every code block in docs/ runs: specs are validated and generated, Python blocks are executed in
order (one namespace per page), shell blocks are run. Docs cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from specformer.codegen import render_model
from specformer.dsl import SpecSet
from specformer.dsl.measure import measure

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))
_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(page: Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in _BLOCK.finditer(page.read_text())]


def check_spec(text: str, where: str) -> None:
    assert not measure(text, where).crowded_lines, f"{where}: one declaration per line"
    specs = SpecSet()
    for path in sorted((ROOT / "specs").glob("*.sf")):
        specs.add_file(path, f"specs/{path.name}")
    for name in specs.add_text(text, where):
        files = render_model(specs.resolved(name))
        for rel, source in files.items():
            compile(source, rel, "exec")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_code_block_runs(page: Path, tmp_path: Path, monkeypatch) -> None:
    found = blocks(page)
    assert found, f"{page.name} has no code blocks"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for index, (language, text) in enumerate(found):
        where = f"{page.name} block {index + 1}"
        if language == "sf":
            check_spec(text, where)
        elif language == "python":
            exec(compile(text, where, "exec"), namespace)  # our own documentation's examples
        elif language == "sh":
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", text], capture_output=True, text=True,
                                    env=os.environ | {"SPECFORMER_DOCS_ROOT": str(ROOT)}, timeout=600)  # fmt: skip
            assert result.returncode == 0, f"{where}:\n{result.stdout}\n{result.stderr}"
        else:
            pytest.fail(f"{where}: code blocks are sf, python or sh; `{language}` cannot be checked")
