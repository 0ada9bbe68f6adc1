"""Loading like a real library: the hub cache offline, sharding, device maps, legacy files, bad files,
and saves that survive being killed."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specformer.generated.llama import LlamaConfig, LlamaForCausalLM
from specformer.runtime import CheckpointError
from specformer.runtime.checkpoint import WEIGHTS_INDEX_NAME, WEIGHTS_NAME

TINY = {"vocab_size": 50, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3}
TINY |= {"num_attention_heads": 4, "num_key_value_heads": 2}


def tiny(**overrides: object) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**(TINY | overrides))).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(6)[None] % 50).logits


def hub_cache(root: Path, repo: str, files: Path, commit: str = "0123456789abcdef") -> None:
    """The huggingface_hub cache layout, as a download would have left it."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in files.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())


def test_hub_id_loads_from_the_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny()
    model.save_pretrained(tmp_path / "saved")
    hub_cache(tmp_path / "cache", "acme/tiny-llama", tmp_path / "saved")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = LlamaForCausalLM.from_pretrained("acme/tiny-llama", cache_dir=tmp_path / "cache")
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    with pytest.raises(CheckpointError, match="acme/other: not in the local hub cache"):
        LlamaForCausalLM.from_pretrained("acme/other", cache_dir=tmp_path / "cache")
    with pytest.raises(CheckpointError, match="not a folder, and not a hub id"):
        LlamaForCausalLM.from_pretrained(tmp_path / "nowhere" / "deeper" / "still")


def test_three_shards_round_trip(tmp_path: Path) -> None:
    model = tiny()
    model.save_pretrained(tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / WEIGHTS_INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) >= 3
    torch.testing.assert_close(
        logits(LlamaForCausalLM.from_pretrained(tmp_path)), logits(model), atol=0, rtol=0
    )


def test_device_map_places_modules(tmp_path: Path) -> None:
    tiny().save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path, device_map={"model.layers.1": "meta", "": "cpu"})
    assert model.model.layers[1].self_attn.q_proj.weight.is_meta
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "cpu"
    assert not model.lm_head.weight.is_meta
    auto = LlamaForCausalLM.from_pretrained(tmp_path, device_map="auto")  # no GPU here: all on the CPU
    assert {p.device.type for p in auto.parameters()} == {"cpu"}
    with pytest.raises(ValueError, match="not a module of LlamaForCausalLM"):
        LlamaForCausalLM.from_pretrained(tmp_path, device_map={"model.layerz": "cpu"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_cuda_without_cuda_is_explained(tmp_path: Path) -> None:
    tiny().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="CUDA is not available"):
        LlamaForCausalLM.from_pretrained(tmp_path, device_map="cuda")


def test_legacy_bin_loads_with_a_warning_and_never_unpickles_code(tmp_path: Path) -> None:
    model = tiny()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.warns(UserWarning, match="legacy pickle checkpoint"):
        loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)

    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.system, ("touch pwned",))

    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Exploit()}))
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="cannot be read safely"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    assert not Path("pwned").exists()


def test_bad_files_name_the_file_and_key(tmp_path: Path) -> None:
    model = tiny()
    model.save_pretrained(tmp_path / "single")
    data = (tmp_path / "single" / WEIGHTS_NAME).read_bytes()
    (tmp_path / "single" / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: not a valid safetensors file .*truncated"
    ):
        LlamaForCausalLM.from_pretrained(tmp_path / "single")

    model.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    index = json.loads((tmp_path / "sharded" / WEIGHTS_INDEX_NAME).read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "sharded" / shard).unlink()
    with pytest.raises(
        CheckpointError, match=rf"maps \d+ tensor\(s\) \(e\.g\. `.+`\) to {shard}, which is missing"
    ):
        LlamaForCausalLM.from_pretrained(tmp_path / "sharded")

    (tmp_path / "sharded" / WEIGHTS_INDEX_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not valid JSON at line 1"):
        LlamaForCausalLM.from_pretrained(tmp_path / "sharded")


KILL_CONFIG = {"vocab_size": 2000, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4}
KILL_CONFIG |= {"num_attention_heads": 4}
SAVER = f"""
import sys, torch
from specformer.generated.llama import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(**{KILL_CONFIG!r}))
print("ready", flush=True)
while True:
    for p in model.parameters():
        p.data.add_(1.0)
    model.save_pretrained(sys.argv[1], max_shard_size=sys.argv[2])
"""


@pytest.mark.slow
@pytest.mark.parametrize("shard_size", ["1MB", "5GB"])
def test_kill_during_save_leaves_a_loadable_checkpoint(tmp_path: Path, shard_size: str) -> None:
    target = tmp_path / "ckpt"
    torch.manual_seed(0)
    initial = dict(LlamaForCausalLM(LlamaConfig(**KILL_CONFIG)).named_parameters())
    for attempt in range(4):
        saver = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(target), shard_size], stdout=subprocess.PIPE
        )
        assert saver.stdout is not None and saver.stdout.readline().strip() == b"ready"
        time.sleep(1.0 + 0.37 * attempt)  # land in different phases of a save
        os.kill(saver.pid, signal.SIGKILL)
        saver.wait()
        if (target / "config.json").exists():
            model = LlamaForCausalLM.from_pretrained(target)
            # every tensor comes from the same save: each moved by the same number of +1 steps
            steps = {round(float((p - initial[name]).mean())) for name, p in model.named_parameters()}
            assert len(steps) == 1, steps
            leftovers = [p.name for p in target.iterdir() if p.name.endswith(".tmp")]
            assert all(name.startswith(".") for name in leftovers)


@pytest.mark.parametrize(
    "shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../outside.safetensors"]
)
def test_a_shard_index_cannot_point_outside_its_folder(tmp_path: Path, shard: str) -> None:
    import json

    from specformer.runtime.checkpoint import CheckpointError, checkpoint_files

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        checkpoint_files(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_attention_heads": 0}, "ZeroDivisionError"),
        ({"pad_token_id": 1000}, "cannot build LlamaForCausalLM"),
        ({"hidden_size": -8}, "cannot build LlamaForCausalLM"),
        ({"vocab_size": 10**6, "hidden_size": 10**6}, r"has [\d,]+ parameters, over the limit"),  # on meta
    ],
)
def test_config_values_that_cannot_make_the_model_raise_a_config_error(
    tmp_path: Path, change: dict, message: str
) -> None:
    import json

    from specformer.generated.llama import LlamaConfig, LlamaForCausalLM
    from specformer.runtime.config import ConfigError

    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    values = json.loads((tmp_path / "config.json").read_text())
    if "num_attention_heads" in change:
        values.pop("head_dim", None)  # derived from the heads, as a config that leaves it out does
    (tmp_path / "config.json").write_text(json.dumps({**values, **change}))
    with pytest.raises(ConfigError, match=message) as err:
        LlamaForCausalLM.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)


class _Killed(Exception):
    pass


def _unlink_dying_at(stop: int):
    real, calls = Path.unlink, [0]

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if calls[0] == stop:
            raise _Killed  # as a SIGKILL would, between two removals
        calls[0] += 1
        real(self, missing_ok=missing_ok)

    return unlink


@pytest.mark.parametrize(("old_size", "new_size"), [("1KB", "5GB"), ("5GB", "1KB"), ("1KB", "2KB")])
def test_a_resave_in_another_layout_loads_as_old_or_new_at_every_removal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old_size: str, new_size: str
) -> None:
    """Kill the saver at each file removal of a layout change (sharded <-> single, other shard counts):
    the folder always loads, whole, as the old or the new checkpoint."""
    import shutil

    from specformer.runtime.checkpoint import checkpoint_files, iter_tensors, save_state_dict

    old = {f"w{i}": torch.full((64,), float(i)) for i in range(6)}
    new = {k: v + 100 for k, v in old.items()}
    removals = 0
    for stop in range(8):
        folder = tmp_path / f"trial{stop}"
        save_state_dict(old, folder, old_size)
        real_unlink = Path.unlink
        dying_unlink = _unlink_dying_at(stop)
        monkeypatch.setattr(Path, "unlink", dying_unlink)
        try:
            save_state_dict(new, folder, new_size)
        except _Killed:
            removals += 1
        finally:
            monkeypatch.setattr(Path, "unlink", real_unlink)
        loaded = dict(iter_tensors(checkpoint_files(folder)))
        assert loaded.keys() == old.keys()
        assert all(torch.equal(loaded[k], old[k]) for k in old) or all(
            torch.equal(loaded[k], new[k]) for k in new
        )
        shutil.rmtree(folder)
    assert removals > 0  # the trials did land between removals


def test_saved_files_follow_the_umask_and_killed_saves_leave_no_temporaries(tmp_path: Path) -> None:
    from specformer.runtime.checkpoint import save_state_dict

    (tmp_path / ".model.safetensors.abc123.tmp").write_bytes(b"\0" * 1000)  # a killed save's leftover
    mask = os.umask(0o022)
    try:
        save_state_dict({"w": torch.zeros(4)}, tmp_path)
    finally:
        os.umask(mask)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"num_hidden_layers": 10_000_000},
            r"`num_hidden_layers` is 10,000,000, the number of a repeated block",
        ),
        ({"num_hidden_layers": -1}, r"`num_hidden_layers` is -1"),
        ({"num_labels": 10**9}, r"`num_labels` is 1,000,000,000"),
    ],
)
def test_counts_a_config_cannot_mean_are_refused_before_building(values: dict, message: str) -> None:
    from specformer.generated.distilbert import DistilBertConfig
    from specformer.generated.llama import LlamaConfig
    from specformer.runtime.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        LlamaConfig(**values)
    if "num_hidden_layers" in values:  # an alias of the counting field is bounded too
        with pytest.raises(ConfigError, match="`n_layers`"):
            DistilBertConfig(num_hidden_layers=values["num_hidden_layers"])


@settings(max_examples=80, deadline=None)
@given(
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_corrupted_safetensors_raise_only_checkpoint_errors(
    tmp_path_factory: pytest.TempPathFactory, flips: list[tuple[int, int]], cut: int | None
) -> None:
    import contextlib

    from safetensors.torch import save_file

    from specformer.runtime.checkpoint import checkpoint_files, iter_tensors

    folder = tmp_path_factory.mktemp("fuzz")
    save_file(
        {"a": torch.randn(4, 4), "b": torch.arange(10)}, str(folder / WEIGHTS_NAME), metadata={"format": "pt"}
    )
    data = bytearray((folder / WEIGHTS_NAME).read_bytes())
    for at, byte in flips:
        data[at % len(data)] = byte
    if cut is not None:
        data = data[: cut % len(data)]
    (folder / WEIGHTS_NAME).write_bytes(bytes(data))
    with contextlib.suppress(CheckpointError):  # or it reads: anything else fails the test
        for _, tensor in iter_tensors(checkpoint_files(folder)):
            tensor.sum()
