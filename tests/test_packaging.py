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
        "optional = ('transformers', 'gguf', 'triton', 'bitsandbytes', 'flash_attn')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in optional)\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# Makes the optional packages unimportable, as on a machine that never installed them.
_HIDE_OPTIONAL = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "gguf", "triton", "bitsandbytes", "flash_attn"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Hide())
"""


def test_works_without_any_optional_package_and_names_the_extra() -> None:
    code = _HIDE_OPTIONAL + (
        "import torch\n"
        "from specformer.generated.llama import LlamaConfig, LlamaForCausalLM\n"
        "from specformer.runtime import hardware\n"
        "assert not hardware.is_bitsandbytes_available() and not hardware.is_triton_available()\n"
        "assert not hardware.is_flash_attn_2_available()\n"
        "config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)\n"
        "model = LlamaForCausalLM(config)\n"
        "model(torch.tensor([[1, 2, 3]]))\n"
        "from specformer.runtime.quantization import BitsAndBytesConfig\n"
        "from specformer.runtime.quantization import quantize\n"
        "try:\n"
        "    quantize(model, BitsAndBytesConfig(load_in_8bit=True))\n"
        "except ImportError as err:\n"
        "    print(err)\n"
        "try:\n"
        "    model.set_kernels('triton')\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (
        'needs the `bitsandbytes` package, which is not installed; run: pip install "specformer[quant]"'
        in result.stdout
    )
    assert (
        'needs the `triton` package, which is not installed; run: pip install "specformer[gpu]"'
        in result.stdout
    )


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
        "specformer/codegen/templates/module.py.jinja",
        "specformer/specs/llama.sf",
        "specformer/generated/llama/modeling_llama.py",
        "specformer/runtime/attention.py",
        "specformer/runtime/cpu_kernels/decode.cpp",  # built on first use
        "specformer/runtime/cpu_kernels/kernels.h",
        "specformer/runtime/cpu_kernels/decode_step.h",
    ):
        assert expected in names, expected
