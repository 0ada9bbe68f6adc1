"""Where training logs go besides the callbacks: a JSON-lines file or TensorBoard (`report_to`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class Reporter:
    def __init__(self, report_to: str | None, output_dir: Path) -> None:
        self.report_to = report_to
        self.output_dir = output_dir
        self._writer: Any = None  # TensorBoard's, made on first use

    def write(self, logs: dict[str, float]) -> None:
        if self.report_to == "jsonl":
            path = self.output_dir / "logs.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as handle:
                handle.write(json.dumps(logs) + "\n")
        elif self.report_to == "tensorboard":
            if self._writer is None:
                from ..hardware import require

                require("tensorboard", "report_to='tensorboard'")
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.output_dir / "runs"))
            for key, value in logs.items():
                if key != "step":
                    self._writer.add_scalar(key, value, logs["step"])
