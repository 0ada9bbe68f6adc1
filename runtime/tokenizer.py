"""Tokenizers through the `tokenizers` library, with special tokens and Jinja chat templates."""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as FastTokenizer

# GGUF token types (llama.cpp): 3 = control, 4 = user defined; both are matched before BPE.
_SPECIAL_TOKEN_TYPES = (3, 4)


class TemplateError(ValueError):
    """A chat template that failed to render (raised by the template itself or by Jinja)."""


class Tokenizer:
    def __init__(
        self,
        tokenizer: FastTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
    ) -> None:
        # Padding and truncation stored in tokenizer.json would apply to every encode; we pad per batch.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.backend = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        if meta.get("model") != "gpt2":
            raise ValueError(
                f"GGUF tokenizer model `{meta.get('model')}` is not supported yet (supported: gpt2)"
            )
        tokens: list[str] = list(meta["tokens"])
        vocab = {token: i for i, token in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
        backend = FastTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if meta.get("pre") in ("smollm", "qwen2", "llama-bpe", "deepseek-llm"):
            # These pre-tokenizers split every digit on its own before the GPT-2 pattern.
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        else:
            backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        types = list(meta.get("token_types") or [])
        specials = [
            AddedToken(tokens[i], special=True) for i, t in enumerate(types) if t in _SPECIAL_TOKEN_TYPES
        ]
        backend.add_special_tokens(specials)
        return cls(
            backend,
            bos_token_id=meta.get("bos_token_id"),
            eos_token_id=meta.get("eos_token_id"),
            pad_token_id=meta.get("pad_token_id"),
            add_bos_token=bool(meta.get("add_bos_token")),
            chat_template=meta.get("chat_template"),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """A Hugging Face folder with `tokenizer.json` and, optionally, `tokenizer_config.json`."""
        folder = Path(path)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{folder}: no tokenizer.json")
        backend = FastTokenizer.from_file(str(file))
        settings: dict[str, Any] = {}
        config_file = folder / "tokenizer_config.json"
        if config_file.is_file():
            settings = json.loads(config_file.read_text(encoding="utf-8"))

        def token_id(name: str) -> int | None:
            token = settings.get(name)
            if isinstance(token, dict):
                token = token.get("content")
            return backend.token_to_id(token) if isinstance(token, str) else None

        return cls(
            backend,
            bos_token_id=token_id("bos_token"),
            eos_token_id=token_id("eos_token"),
            pad_token_id=token_id("pad_token"),
            add_bos_token=bool(settings.get("add_bos_token", False)),
            chat_template=settings.get("chat_template"),
        )

    # ---- encoding --------------------------------------------------------------------------------
    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; special tokens come from the tokenizer's post-processor (BERT's [CLS] ... [SEP]) or,
        for tokenizers without one (GGUF), from `add_bos_token`."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def batch_encode(
        self, texts: list[str], *, add_special_tokens: bool = True, padding_side: str = "right"
    ) -> dict[str, torch.Tensor]:
        """`input_ids` and `attention_mask`, padded to the longest text with the pad token."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side is `{padding_side}`; expected `left` or `right`")
        encoded = [self.encode(text, add_special_tokens) for text in texts]
        if self.pad_token_id is None and len({len(e) for e in encoded}) > 1:
            raise ValueError("texts of different lengths need a pad token, and this tokenizer has none")
        width = max(map(len, encoded), default=0)
        ids = torch.full((len(texts), width), self.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(texts), width), dtype=torch.long)
        for row, tokens in enumerate(encoded):
            span = slice(width - len(tokens), width) if padding_side == "left" else slice(0, len(tokens))
            ids[row, span] = torch.tensor(tokens, dtype=torch.long)
            mask[row, span] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat ------------------------------------------------------------------------------------
    @cached_property
    def _template_env(self) -> ImmutableSandboxedEnvironment:
        # Templates come with checkpoints: render them sandboxed, as Hugging Face does.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        return env

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False, tokenize: bool = True
    ) -> str | list[int]:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; pass plain text instead")
        try:
            template = self._template_env.from_string(self.chat_template)
            text = template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.token(self.bos_token_id) or "",
                eos_token=self.token(self.eos_token_id) or "",
            )
        except TemplateError:
            raise
        except Exception as err:  # jinja2 errors of every kind, and sandbox violations
            raise TemplateError(f"chat template failed to render: {err}") from err
        return self.encode(text, add_special_tokens=False) if tokenize else text
