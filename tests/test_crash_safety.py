"""Kill trials: a save killed at any moment leaves a folder that loads, whole, as the old state or the new.

Each trial forks a child that re-saves over a known old state and SIGKILLs itself at a chosen point:
at every file rename and removal the save makes, and at random Python lines (counted with a trace
function, so the points are reproducible and no timing is involved). The parent then loads the folder
and checks that every tensor, the config and the trainer state all come from one of the two saves.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from specformer.generated.llama import LlamaConfig, LlamaForCausalLM

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kill trials fork the saver")

TRIALS = 32  # per layout change, beyond the one at each rename and removal
SMALL = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}


def tiny_llama(layers: int, seed: int, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SMALL, num_hidden_layers=layers)).to(dtype)


FS_CALLS = ("replace", "rename", "unlink", "rmdir")


def _instrument(kind: str, stop: int | None) -> list[int]:
    """In a (child) process: count events of `kind` (`fs`: renames and removals; `line`: Python lines
    executed) and SIGKILL this process at the `stop`-th. Returns the live count."""
    count = [0]

    def tick() -> None:
        count[0] += 1
        if count[0] == stop:
            os.kill(os.getpid(), signal.SIGKILL)

    if kind == "line":

        def trace(frame, event, arg):
            if event == "line":
                tick()
            return trace

        sys.settrace(trace)
        return count
    for name in FS_CALLS:
        real = getattr(os, name)

        def dying(*args, _real=real, **kwargs):
            tick()
            return _real(*args, **kwargs)

        setattr(os, name, dying)
    return count


def _in_child(folder: Path, old: Path, body: Callable[[], None]) -> int:
    """Reset `folder` to the `old` state, run `body` in a forked child; its wait status."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(old, folder)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            torch.set_num_threads(1)  # OpenMP's thread pool does not survive fork
            body()
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


def _count_events(kind: str, save: Callable[[Path], None], folder: Path, old: Path) -> int:
    """How many events of `kind` one whole save makes (counted in a child, reported through a file)."""
    report = folder.parent / f"{kind}-count.txt"

    def body() -> None:
        count = _instrument(kind, None)
        save(folder)
        sys.settrace(None)
        report.write_text(str(count[0]))

    _in_child(folder, old, body)
    return int(report.read_text())


def run_trials(
    tmp_path: Path,
    write_old: Callable[[Path], None],
    save_new: Callable[[Path], None],
    load: Callable[[Path], object],
) -> dict[str, int]:
    """Kill `save_new` at every rename/removal and at TRIALS random lines; every folder must `load` as
    the old state or the new. Returns how many trials ended in each."""
    old, new, scratch = tmp_path / "old", tmp_path / "new", tmp_path / "trial" / "folder"
    scratch.parent.mkdir()
    write_old(old)
    shutil.copytree(old, new)
    save_new(new)
    expected = {"old": load(old), "new": load(new)}
    assert expected["old"] != expected["new"]
    points = [("fs", k) for k in range(1, _count_events("fs", save_new, scratch, old) + 1)]
    rng = random.Random(0)
    lines = _count_events("line", save_new, scratch, old)
    points += [("line", rng.randrange(1, lines + 1)) for _ in range(TRIALS)]
    outcomes = {"old": 0, "new": 0}
    for kind, stop in points:

        def body(kind: str = kind, stop: int = stop) -> None:
            _instrument(kind, stop)
            save_new(scratch)

        status = _in_child(scratch, old, body)
        got = load(scratch)
        state = next((name for name, value in expected.items() if got == value), None)
        assert state is not None, (
            f"killed at {kind} {stop}: the folder loads as neither the old nor the new save"
        )
        outcomes[state] += 1
        if kind == "fs":
            assert os.WIFSIGNALED(status), f"the save made fewer than {stop} renames/removals"
    assert outcomes["old"] and outcomes["new"], outcomes  # the kills landed on both sides of the commit
    return outcomes


def model_state(folder: Path) -> object:
    """Everything a load of `folder` yields, as comparable data: config and every tensor's bytes."""
    model = LlamaForCausalLM.from_pretrained(folder)
    config = model.config.to_dict()
    tensors = {
        k: (v.dtype, v.shape, v.float().sum().item(), v.float().square().sum().item())
        for k, v in model.state_dict().items()
    }
    return config, tensors, model.dtype


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param((2, torch.float32, "5GB"), (2, torch.float32, "4KB"), id="single-to-sharded"),
        pytest.param((2, torch.float32, "4KB"), (2, torch.float32, "5GB"), id="sharded-to-single"),
        pytest.param((2, torch.float32, "4KB"), (2, torch.float32, "8KB"), id="other-shard-count"),
        pytest.param((4, torch.float32, "4KB"), (3, torch.float32, "4KB"), id="another-model"),
        pytest.param((2, torch.bfloat16, "5GB"), (2, torch.float32, "5GB"), id="another-dtype"),
    ],
)
def test_a_killed_save_pretrained_loads_as_old_or_new(tmp_path: Path, old: tuple, new: tuple) -> None:
    def saver(layers: int, dtype: torch.dtype, shard: str, seed: int) -> Callable[[Path], None]:
        model = tiny_llama(layers, seed, dtype)
        return lambda folder: model.save_pretrained(folder, max_shard_size=shard)

    outcomes = run_trials(tmp_path, saver(*old, seed=0), saver(*new, seed=1), model_state)
    assert sum(outcomes.values()) >= TRIALS


def test_a_killed_trainer_checkpoint_resave_loads_as_old_or_new(tmp_path: Path) -> None:
    """The Trainer re-saving an existing checkpoint-N (a resumed run reaching the same step)."""
    from specformer.runtime.training import TrainingArguments
    from specformer.runtime.training.callbacks import TrainerState
    from specformer.runtime.training.checkpoints import checkpoints, write_checkpoint

    def saver(seed: int) -> Callable[[Path], None]:
        model = tiny_llama(2, seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1 * (seed + 1))
        state = TrainerState(global_step=8, epoch=float(seed))

        def save(root: Path) -> None:
            args = TrainingArguments(output_dir=str(root), disable_tqdm=True, plot=False)
            write_checkpoint(root / "checkpoint-8", model.state_dict(), {"optimizer": optimizer}, state, args)

        return save

    def load(root: Path) -> object:
        found = checkpoints(root)
        assert [p.name for p in found] == ["checkpoint-8"], found
        folder = found[-1]
        tensors = model_state_dict(folder)
        optimizer = torch.load(folder / "optimizer.pt", weights_only=True)["param_groups"][0]["lr"]
        return (folder / "trainer_state.json").read_text(), tensors, optimizer

    run_trials(tmp_path, saver(0), saver(1), load)


def model_state_dict(folder: Path) -> dict:
    from specformer.runtime.checkpoint import checkpoint_files, iter_tensors

    return {k: v.sum().item() for k, v in iter_tensors(checkpoint_files(folder))}
