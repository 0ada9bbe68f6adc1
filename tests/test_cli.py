"""`specformer check` fails loudly on drift and on errors; `generate` writes only what changed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "specformer.codegen.cli", *args], capture_output=True, text=True
    )


@pytest.fixture()
def workspace(tmp_path: Path) -> tuple[Path, Path]:
    specs, out = tmp_path / "specs", tmp_path / "generated"
    shutil.copytree(ROOT / "specs", specs, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "generated", out, ignore=shutil.ignore_patterns("__pycache__"))
    return specs, out


def test_check_passes_when_in_sync(workspace: tuple[Path, Path]) -> None:
    specs, out = workspace
    result = run("--specs", str(specs), "--out", str(out), "check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_fails_with_a_diff_when_a_generated_file_is_edited(workspace: tuple[Path, Path]) -> None:
    specs, out = workspace
    modeling = out / "llama" / "modeling_llama.py"
    modeling.write_text(modeling.read_text().replace("return x + self.mlp(", "return x - self.mlp("))
    result = run("--specs", str(specs), "--out", str(out), "check")
    assert result.returncode == 1
    assert "-        return x - self.mlp(" in result.stdout
    assert "+        return x + self.mlp(" in result.stdout


def test_check_fails_when_a_spec_changes_without_regenerating(workspace: tuple[Path, Path]) -> None:
    specs, out = workspace
    spec = specs / "llama.sf"
    spec.write_text(spec.read_text().replace("vocab_size: int = 32000", "vocab_size: int = 32001"))
    result = run("--specs", str(specs), "--out", str(out), "check")
    assert result.returncode == 1
    assert "vocab_size: int = 32001" in result.stdout
    # `generate` repairs it; a second run has nothing left to write
    generate = run("--specs", str(specs), "--out", str(out), "generate")
    assert generate.returncode == 0
    assert "wrote" in generate.stdout
    assert run("--specs", str(specs), "--out", str(out), "check").returncode == 0
    again = run("--specs", str(specs), "--out", str(out), "generate")
    assert "wrote" not in again.stdout and "0 file(s) changed" in again.stdout


def test_check_reports_stale_packages(workspace: tuple[Path, Path]) -> None:
    specs, out = workspace
    (specs / "modernbert.sf").unlink()  # a spec no other extends
    result = run("--specs", str(specs), "--out", str(out), "check")
    assert result.returncode == 1
    assert "stale" in result.stdout and "modernbert" in result.stdout


def test_check_fails_on_a_broken_spec(workspace: tuple[Path, Path]) -> None:
    specs, out = workspace
    (specs / "broken.sf").write_text("model Broken extends Nope { }\n")
    result = run("--specs", str(specs), "--out", str(out), "check")
    assert result.returncode != 0
    assert "broken.sf:1:22" in result.stderr


def test_validate_prints_the_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sf"
    bad.write_text(
        "model Bad {\n  config { hidden_size: int = 8 }\n  backbone M as m {\n"
        "    e = Embedding(10, hiden_size)\n    forward(input_ids) { return e(input_ids) }\n  }\n}\n"
    )
    result = run("validate", str(bad))
    assert result.returncode == 1
    assert "bad.sf:4:23: error: unknown field `hiden_size`" in result.stderr
    assert "did you mean `hidden_size`?" in result.stderr


def test_validate_accepts_a_delta_of_an_installed_spec(tmp_path: Path) -> None:
    spec = tmp_path / "mine.sf"
    spec.write_text(
        'model Mine extends Llama {\n  model_type = "mine"\n  config { rms_norm_eps = 1e-5 }\n}\n'
    )
    result = run("validate", str(spec))
    assert result.returncode == 0, result.stderr
    assert "model Mine is valid" in result.stdout


def test_new_show_generate_import_instantiate(workspace: tuple[Path, Path], tmp_path: Path) -> None:
    """`specformer new` scaffolds a spec and a test; the spec shows, generates, imports and runs."""
    specs, out = workspace
    created = run(
        "--specs", str(specs), "new", "tiny_llama", "--from", "llama", "--tests", str(tmp_path / "t")
    )
    assert created.returncode == 0, created.stderr
    spec = specs / "tiny_llama.sf"
    assert "model TinyLlama extends Llama" in spec.read_text()
    shown = run("show", str(spec))
    assert shown.returncode == 0, shown.stderr
    assert "TinyLlamaConfig (model_type 'tiny_llama')" in shown.stdout
    assert "32 x TinyLlamaDecoderLayer" in shown.stdout and "6,738,415,616 parameters" in shown.stdout
    assert "model.layers.0.self_attn.q_proj.weight  (4096, 4096)" in shown.stdout
    generated = run("--specs", str(specs), "--out", str(out), "generate", "TinyLlama")
    assert generated.returncode == 0, generated.stderr
    script = (
        f"import sys; sys.path.insert(0, {str(out)!r})\n"
        "import torch, tiny_llama\n"  # the package is named after the model_type
        "config = tiny_llama.TinyLlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,\n"
        "                                    num_hidden_layers=1, num_attention_heads=2)\n"
        "print(tiny_llama.TinyLlamaForCausalLM(config)(torch.tensor([[1, 2]])).logits.shape)\n"
    )
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert ran.returncode == 0 and "torch.Size([1, 2, 32])" in ran.stdout, ran.stderr
    scaffolded_test = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", str(tmp_path / "t")], capture_output=True, text=True
    )
    assert scaffolded_test.returncode == 0, scaffolded_test.stdout
    again = run("--specs", str(specs), "new", "tiny_llama", "--from", "llama", "--tests", str(tmp_path / "t"))
    assert again.returncode == 1 and "already exists" in again.stderr
