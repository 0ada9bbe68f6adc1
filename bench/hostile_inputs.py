"""Time and memory each hostile input of the test battery takes, against the budget issue 17 sets
(every one refused in under 2 s and under 1 GiB of added peak memory). The test suite checks only that
each ends in the library's own error; this prints what each costs, slowest first.

    python bench/hostile_inputs.py [--top 15]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_hostile_inputs import CASES, make_valid_artifacts, run_isolated

BUDGET_SECONDS, BUDGET_BYTES = 2.0, 2**30


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--top", type=int, default=15, help="how many of the costliest inputs to list")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        valid = make_valid_artifacts(Path(root) / "valid")
        for index, item in enumerate(CASES):
            folder = Path(root) / f"case{index}"
            folder.mkdir()
            outcome, grown = run_isolated(item.build(folder, valid))
            rows.append((outcome.get("seconds", float("nan")), grown, item.name, outcome.get("error")))
    rows.sort(reverse=True)
    print(f"{'input':45} {'seconds':>8} {'MiB':>8}  error")
    for seconds, grown, name, error in rows[: args.top]:
        print(f"{name:45} {seconds:8.3f} {grown / 2**20:8.1f}  {error}")
    slowest, biggest = max(r[0] for r in rows), max(r[1] for r in rows)
    over = [r[2] for r in rows if r[0] > BUDGET_SECONDS or r[1] > BUDGET_BYTES]
    print(
        f"\n{len(rows)} inputs; slowest {slowest:.3f} s ({slowest / BUDGET_SECONDS:.2f}x the 2 s budget), "
        f"largest {biggest / 2**20:.1f} MiB ({biggest / BUDGET_BYTES:.3f}x the 1 GiB budget); "
        f"over budget: {over or 'none'}"
    )


if __name__ == "__main__":
    main()
