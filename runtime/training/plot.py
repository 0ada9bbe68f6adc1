"""The loss and learning-rate curves as a small PNG, drawn without a plotting library.

Two stacked panels share the step axis: training loss (blue, evaluation loss as red dots) on top and
the learning rate (green) below, each scaled to its own range. matplotlib is not a dependency, so the
image is rasterised here and written with zlib.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from pathlib import Path

from ..files import atomic_path

WIDTH, HEIGHT, MARGIN = 640, 420, 20
BLUE, RED, GREEN, GREY = (31, 119, 180), (214, 39, 40), (44, 160, 44), (170, 170, 170)


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, color: tuple[int, int, int], size: int = 1) -> None:
        for dx in range(-size + 1, size):
            for dy in range(-size + 1, size):
                px, py = x + dx, y + dy
                if 0 <= px < self.width and 0 <= py < self.height:
                    i = (py * self.width + px) * 3
                    self.pixels[i : i + 3] = bytes(color)

    def line(self, a: tuple[int, int], b: tuple[int, int], color: tuple[int, int, int]) -> None:
        steps = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
        for k in range(steps + 1):
            self.dot(round(a[0] + (b[0] - a[0]) * k / steps), round(a[1] + (b[1] - a[1]) * k / steps), color)

    def box(self, left: int, top: int, right: int, bottom: int) -> None:
        for a, b in (((left, top), (right, top)), ((right, top), (right, bottom)),
                     ((right, bottom), (left, bottom)), ((left, bottom), (left, top))):  # fmt: skip
            self.line(a, b, GREY)

    def png(self) -> bytes:
        rows = b"".join(
            b"\x00" + bytes(self.pixels[y * self.width * 3 : (y + 1) * self.width * 3])
            for y in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows, 9))
            + chunk(b"IEND", b"")
        )


def _panel(
    canvas: Canvas,
    top: int,
    bottom: int,
    series: list[tuple[list[tuple[float, float]], tuple, bool]],
    max_step: float,
) -> None:
    left, right = MARGIN, canvas.width - MARGIN
    canvas.box(left, top, right, bottom)
    values = [v for points, _, _ in series for _, v in points]
    if not values:
        return
    low, high = min(values), max(values)
    span = (high - low) or 1.0

    def place(step: float, value: float) -> tuple[int, int]:
        x = left + (right - left) * (step / max(max_step, 1.0))
        y = bottom - (bottom - top) * ((value - low) / span)
        return round(x), round(y)

    for points, color, dots in series:
        placed = [place(s, v) for s, v in points]
        if dots:
            for p in placed:
                canvas.dot(*p, color, size=3)
        else:
            for a, b in itertools.pairwise(placed):
                canvas.line(a, b, color)


def write_loss_plot(path: str | Path, log_history: list[dict[str, float]]) -> Path:
    """Draw `loss`/`eval_loss` and `learning_rate` against `step` from a trainer's log history."""
    loss = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evaluation = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    rate = [(h["step"], h["learning_rate"]) for h in log_history if "learning_rate" in h]
    max_step = max([s for s, _ in loss + evaluation + rate] or [1])
    canvas = Canvas(WIDTH, HEIGHT)
    middle = HEIGHT * 2 // 3
    _panel(canvas, MARGIN, middle - MARGIN // 2, [(loss, BLUE, False), (evaluation, RED, True)], max_step)
    _panel(canvas, middle + MARGIN // 2, HEIGHT - MARGIN, [(rate, GREEN, False)], max_step)
    with atomic_path(path) as tmp:
        tmp.write_bytes(canvas.png())
    return Path(path)
