"""One distribution, everything under `specformer.*`, and no transformers at import time."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_importing_specformer_never_imports_transformers() -> None:
    code = (
        "import sys, specformer.runtime, specformer.dsl, specformer.codegen, specformer.generated.llama\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'gguf'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_wheel_installs_only_the_specformer_namespace(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    wheel = next(tmp_path.glob("specformer-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.startswith("specformer-")}
    assert top == {"specformer"}
    for expected in (
        "specformer/dsl/grammar.lark",
        "specformer/codegen/templates/modeling.py.jinja",
        "specformer/specs/llama.sf",
        "specformer/generated/llama/modeling_llama.py",
        "specformer/runtime/attention.py",
    ):
        assert expected in names, expected
