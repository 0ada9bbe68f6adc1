"""Streaming text as it is generated: to stdout, or to an iterator another thread reads."""

from __future__ import annotations

import queue
import sys
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import GenerationError


class TextStreamer:
    """Prints text as words complete (at spaces and newlines; at once for CJK characters)."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.printed = 0
        self.prompt_pending = True

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.shape[0] > 1:
            raise GenerationError("streaming supports a single sequence (batch size 1)")
        if self.skip_prompt and self.prompt_pending:
            self.prompt_pending = False
            return
        self.prompt_pending = False
        self.tokens.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\n"):
            piece, self.tokens, self.printed = text[self.printed :], [], 0
        elif text and _is_cjk(text[-1]):
            piece = text[self.printed :]
            self.printed += len(piece)
        else:  # hold back the word still being formed, and half-decoded bytes
            end = text.rfind(" ") + 1
            piece = text[self.printed : end] if end > self.printed else ""
            self.printed += len(piece)
        if piece:
            self.on_text(piece, stream_end=False)

    def end(self) -> None:
        text = (
            self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip_special_tokens)
            if self.tokens
            else ""
        )
        self.tokens, self.prompt_pending = [], True
        piece, self.printed = text[self.printed :], 0
        self.on_text(piece, stream_end=True)

    def on_text(self, text: str, stream_end: bool = False) -> None:
        print(text, end="" if not stream_end else "\n", flush=True, file=sys.stdout)


class TextIteratorStreamer(TextStreamer):
    """Text pieces through a thread-safe queue: run `generate` in a thread and iterate here."""

    _END = object()

    def __init__(
        self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(tokenizer, skip_prompt=skip_prompt, **kwargs)
        self.queue: queue.Queue = queue.Queue()
        self.timeout = timeout

    def on_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.queue.put(text, timeout=self.timeout)
        if stream_end:
            self.queue.put(self._END, timeout=self.timeout)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        value = self.queue.get(timeout=self.timeout)
        if value is self._END:
            raise StopIteration
        return value


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return any(
        lo <= code <= hi
        for lo, hi in (
            (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
            (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
        )
    )  # fmt: skip
