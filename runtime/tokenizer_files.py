"""A tokenizer folder as transformers lays it out: `tokenizer.json`, `tokenizer_config.json` (special tokens,
sides, maximum length, class) and `chat_template.jinja`; read with every value checked, written
atomically."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as FastTokenizer

from .errors import TokenizerError
from .files import atomic_write_text, read_json_object

MAX_TOKENIZER_BYTES = 512 * 2**20  # the largest tokenizer.json read (published ones are tens of MB)


def read_folder(folder: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments a tokenizer folder holds; `overrides` (sides, maximum length) win."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        found = "is not a regular file" if file.exists() else "is missing"
        raise TokenizerError(f"{file} {found} (only fast tokenizers, tokenizer.json, are supported)")
    if file.stat().st_size > MAX_TOKENIZER_BYTES:
        raise TokenizerError(
            f"{file}: {file.stat().st_size:,} bytes; tokenizer files are expected under {MAX_TOKENIZER_BYTES:,}"
        )
    try:
        backend = FastTokenizer.from_file(str(file))
    except Exception as err:  # the tokenizers library raises its own plain Exception
        raise TokenizerError(f"{file}: not a valid tokenizer.json ({err}); it may be truncated") from err
    settings: dict[str, Any] = {}
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        settings = read_json_object(config_file, TokenizerError)

    def token_id(name: str) -> int | None:
        token = settings.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        if token is not None and not isinstance(token, str):
            raise TokenizerError(f"{config_file}: `{name}` is {token!r}; expected a token's text")
        found = backend.token_to_id(token) if token is not None else None
        if token is not None and found is None:
            warnings.warn(
                f"{config_file}: `{name}` {token!r} is not in the vocabulary; ignored", stacklevel=3
            )
        return found

    template = settings.get("chat_template")
    if isinstance(template, list):  # several named templates: use the default one
        named = [t for t in template if isinstance(t, dict) and isinstance(t.get("template"), str)]
        template = next((t["template"] for t in named if t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{config_file}: `chat_template` is {type(template).__name__}; expected text")
    if (folder / "chat_template.jinja").is_file():
        try:
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise TokenizerError(f"{folder / 'chat_template.jinja'}: not UTF-8 text ({err})") from None
    sides = {}
    for key in ("padding_side", "truncation_side"):
        sides[key] = overrides.get(key) or settings.get(key, "right")
        if sides[key] not in ("left", "right"):
            raise TokenizerError(f"{config_file}: `{key}` is {sides[key]!r}; expected 'left' or 'right'")
    max_length = overrides.get("model_max_length") or settings.get("model_max_length")
    names = settings.get("model_input_names")
    return dict(
        tokenizer=backend,
        bos_token_id=token_id("bos_token"),
        eos_token_id=token_id("eos_token"),
        pad_token_id=token_id("pad_token"),
        unk_token_id=token_id("unk_token"),
        mask_token_id=token_id("mask_token"),
        add_bos_token=bool(settings.get("add_bos_token", False)),
        chat_template=template,
        model_max_length=max_length if isinstance(max_length, int) and max_length < 10**9 else None,
        model_input_names=names if isinstance(names, list) else None,
        tokenizer_class=settings.get("tokenizer_class")
        if isinstance(settings.get("tokenizer_class"), str)
        else None,
        **sides,
    )


def write_folder(tokenizer: Any, folder: Path) -> tuple[str, ...]:
    """What transformers writes for a fast tokenizer; each file whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {
        "tokenizer_class": tokenizer.tokenizer_class or "PreTrainedTokenizerFast",
        "padding_side": tokenizer.padding_side,
        "truncation_side": tokenizer.truncation_side,
        "add_bos_token": tokenizer.add_bos_token,
    }
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token"):
        if getattr(tokenizer, name) is not None:
            settings[name] = getattr(tokenizer, name)
    if tokenizer.model_max_length is not None:
        settings["model_max_length"] = tokenizer.model_max_length
    if tokenizer.model_input_names is not None:
        settings["model_input_names"] = tokenizer.model_input_names
    written = [folder / "tokenizer.json", folder / "tokenizer_config.json"]
    atomic_write_text(written[0], tokenizer.backend.to_str())
    atomic_write_text(written[1], json.dumps(settings, indent=2, sort_keys=True) + "\n")
    if tokenizer.chat_template:
        written.append(folder / "chat_template.jinja")
        atomic_write_text(written[2], tokenizer.chat_template)
    return tuple(str(p) for p in written)
