"""Tokenizers through the `tokenizers` library, with special tokens and Jinja chat templates."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as FastTokenizer

from .chat_template import render_chat
from .encoding import BatchEncoding
from .errors import ArgumentError, TemplateError, TokenizerError
from .tokenizer_files import read_folder, write_folder


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str]) -> FastTokenizer:
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    backend = FastTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    # The GPT-2 byte-level split, as transformers builds GGUF tokenizers. (llama.cpp's own `pre` variants,
    # e.g. SmolLM's digit splitting, differ on rare inputs such as spaces before a digit.)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str]) -> FastTokenizer:
    """SentencePiece's BPE: spaces as `▁`, unknown characters as byte tokens (`<0x41>`)."""
    # a token of only spaces is stored with real spaces; text reaches the model with `▁` for each
    tokens = ["▁" * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = {token: i for i, token in enumerate(tokens)}
    scores = list(meta.get("scores") or [])
    if meta.get("merges"):
        merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    elif len(scores) == len(tokens):
        merges = merges_from_scores(vocab, dict(zip(tokens, scores, strict=True)))
    else:
        raise TokenizerError(
            f"GGUF tokenizer: a SentencePiece vocabulary of {len(tokens):,} tokens needs merges or one score "
            f"per token; it has {len(scores):,} scores"
        )
    backend = FastTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if prefix else steps)
    return backend


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The merges a scored vocabulary implies: every split of a token into two tokens, best score first
    (ties: the longer left part first), as transformers orders them."""
    found = []
    for token, score in scores.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token))]
        pairs = sorted(
            (p for p in pairs if p[0] in vocab and p[1] in vocab), key=lambda p: (vocab[p[0]], vocab[p[1]])
        )
        found += [(left, right, score) for left, right in pairs]
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


# transformers' tokenizer classes whose `model_input_names` include token_type_ids (a config's
# `tokenizer_class` names one of its classes; the rest return input_ids and attention_mask only).
_TOKEN_TYPE_CLASSES = frozenset(
    {
        "BertTokenizer", "AlbertTokenizer", "ElectraTokenizer", "DebertaTokenizer", "DebertaV2Tokenizer",
        "XLNetTokenizer", "FunnelTokenizer", "LayoutLMTokenizer", "MobileBertTokenizer", "ConvBertTokenizer",
        "SqueezeBertTokenizer", "RoFormerTokenizer", "DPRQuestionEncoderTokenizer",
        "DPRContextEncoderTokenizer", "DPRReaderTokenizer",
    }
)  # fmt: skip

# `tokenizer.ggml.model` -> how its vocabulary becomes a tokenizer
_GGUF_TOKENIZERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}


def gguf_backend(meta: dict[str, Any]) -> FastTokenizer:
    """The fast tokenizer a GGUF file's vocabulary describes, its special token ids checked."""
    kind = meta.get("model")
    if kind not in _GGUF_TOKENIZERS:
        raise TokenizerError(
            f"GGUF tokenizer model `{kind}` is not supported yet (supported: {', '.join(_GGUF_TOKENIZERS)})"
        )
    tokens: list[str] = list(meta["tokens"])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, int) and 0 <= value < len(tokens)):
            raise TokenizerError(
                f"GGUF tokenizer: `{key}` is {value!r}; expected a token id below its {len(tokens):,} tokens"
            )
    backend = _GGUF_TOKENIZERS[kind](meta, tokens)
    types = list(meta.get("token_types") or [])
    # control tokens are special; user-defined ones are matched whole but are ordinary text
    backend.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3]
    )
    backend.add_tokens(
        [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == 4]
    )
    return backend


class Tokenizer:
    """A fast tokenizer with the Hugging Face calling conventions most code relies on."""

    def __init__(
        self,
        tokenizer: FastTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
        padding_side: str = "right",
        truncation_side: str = "right",
        model_max_length: int | None = None,
        model_input_names: list[str] | None = None,
        unk_token_id: int | None = None,
        tokenizer_class: str | None = None,
        mask_token_id: int | None = None,
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
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = model_max_length
        self.model_input_names = model_input_names
        self.unk_token_id = unk_token_id
        self.tokenizer_class = tokenizer_class
        self.mask_token_id = mask_token_id

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """The tokenizer a GGUF file describes: byte-level BPE (`gpt2`) or SentencePiece BPE (`llama`, with
        byte fallback and merges recovered from the token scores when the file lists none)."""
        backend = gguf_backend(meta)
        return cls(
            backend,
            bos_token_id=meta.get("bos_token_id"),
            eos_token_id=meta.get("eos_token_id"),
            pad_token_id=meta.get("pad_token_id"),
            add_bos_token=bool(meta.get("add_bos_token")),
            chat_template=meta.get("chat_template"),
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        padding_side: str | None = None,
        truncation_side: str | None = None,
        model_max_length: int | None = None,
        subfolder: str = "",
        **hub: Any,
    ) -> Tokenizer:
        """A folder or hub id with `tokenizer.json` and, optionally, `tokenizer_config.json` (special
        tokens, `padding_side`, `chat_template`) and `chat_template.jinja`. The keyword settings override
        the folder's; `hub`: revision, cache_dir, local_files_only, token."""
        from .hub import resolve

        unknown = sorted(set(hub) - {"revision", "cache_dir", "local_files_only", "token"})
        if unknown:
            raise ArgumentError(
                f"Tokenizer.from_pretrained() got an unexpected keyword argument `{unknown[0]}`"
            )
        folder = resolve(path, **hub) / subfolder
        overrides = {"padding_side": padding_side, "truncation_side": truncation_side,
                     "model_max_length": model_max_length}  # fmt: skip
        return cls(**read_folder(folder, {k: v for k, v in overrides.items() if v is not None}))

    def save_pretrained(self, directory: str | os.PathLike) -> tuple[str, ...]:
        """`tokenizer.json`, `tokenizer_config.json` (special tokens, sides, maximum length) and
        `chat_template.jinja`, as transformers writes them; each written whole or not at all."""
        return write_folder(self, Path(directory))

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

    def __call__(
        self,
        text: str | list[str],
        text_pair: str | list[str] | None = None,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str = False,
        max_length: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool = True,
    ) -> BatchEncoding:
        """`input_ids` and `attention_mask` (and `token_type_ids`) for one text, a batch, or sentence pairs
        (`text_pair`: BERT's question/context), as transformers' tokenizers return them.

        `padding`: False, True / "longest", or "max_length"; `truncation`: True / "longest_first",
        "only_first" or "only_second", to `max_length` (or the model's maximum), counting the special
        tokens; `return_tensors`: "pt", "np" or None (lists).
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        pairs = (
            None if text_pair is None else ([text_pair] if isinstance(text_pair, str) else list(text_pair))
        )
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts and {len(pairs)} text pairs; expected one pair per text")
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side is `{side}`; expected `left` or `right`")
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding is {padding!r}; expected False, True, 'longest' or 'max_length'")
        encoded = self._encode_all(texts, pairs, add_special_tokens, truncation, max_length)
        width = max((len(ids) for ids, _ in encoded), default=0)
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs `max_length`")
            width = max(width, max_length)
        pad = padding in (True, "longest", "max_length")
        if pad and self.pad_token_id is None:
            raise ValueError(
                "padding needs a pad token, and this tokenizer has none (set tokenizer.pad_token, e.g. to "
                "tokenizer.eos_token)"
            )
        if not pad and return_tensors is not None and len({len(ids) for ids, _ in encoded}) > 1:
            raise ValueError("texts of different lengths cannot form one tensor without padding=True")
        types = return_token_type_ids if return_token_type_ids is not None else self.uses_token_types
        rows: dict[str, list[list[int]]] = {"input_ids": [], "token_type_ids": [], "attention_mask": []}
        for ids, type_ids in encoded:
            fill = width - len(ids) if pad else 0

            def padded(values: list[int], value: int, fill: int = fill) -> list[int]:
                return [value] * fill + values if side == "left" else values + [value] * fill

            rows["input_ids"].append(padded(ids, self.pad_token_id or 0))
            rows["token_type_ids"].append(padded(type_ids, 0))
            rows["attention_mask"].append(padded([1] * len(ids), 0))
        keep = [
            "input_ids",
            *(["token_type_ids"] if types else []),
            *(["attention_mask"] if return_attention_mask else []),
        ]
        result = BatchEncoding(
            {k: rows[k][0] if single and return_tensors is None else rows[k] for k in keep}
        )
        return result.convert_to_tensors(return_tensors)

    def _encode_all(
        self,
        texts: list[str],
        pairs: list[str] | None,
        add_special_tokens: bool,
        truncation: bool | str,
        max_length: int | None,
    ) -> list[tuple[list[int], list[int]]]:
        """(ids, token type ids) per text or pair; truncated by the backend, which counts the special
        tokens its template adds."""
        strategy = {True: "longest_first", "longest_first": "longest_first", "only_first": "only_first",
                    "only_second": "only_second", False: None, "do_not_truncate": None}.get(truncation, "?")  # fmt: skip
        if strategy == "?":
            raise ValueError(
                f"truncation is {truncation!r}; expected True, 'longest_first', 'only_first' or 'only_second'"
            )
        limit = max_length if max_length is not None else self.model_max_length
        if strategy is not None and limit is None:
            raise ValueError("truncation needs `max_length` (this tokenizer has no model_max_length)")
        if strategy is not None:
            self.backend.enable_truncation(limit, strategy=strategy, direction=self.truncation_side)
        try:
            if pairs is None:
                found = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
            else:
                found = self.backend.encode_batch(
                    list(zip(texts, pairs, strict=True)), add_special_tokens=add_special_tokens
                )
        finally:
            self.backend.no_truncation()
        out = []
        bos = self.bos_token_id
        for encoding in found:
            ids, types = list(encoding.ids), list(encoding.type_ids)
            if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
                ids, types = [bos, *ids], [0, *types]  # tokenizers without a template (GGUF)
                if strategy is not None and len(ids) > limit:  # type: ignore[operator]
                    ids, types = ids[:limit], types[:limit]
            out.append((ids, types))
        return out

    @property
    def uses_token_types(self) -> bool:
        """Whether calls return `token_type_ids` by default, as transformers decides: the tokenizer config's
        `model_input_names`, else its `tokenizer_class`'s (BERT-style classes return them, others not)."""
        if self.model_input_names is not None:
            return "token_type_ids" in self.model_input_names
        return (self.tokenizer_class or "").removesuffix("Fast") in _TOKEN_TYPE_CLASSES

    # ---- special tokens by text, as transformers spells them ----------------------------------------
    def _set_token(self, name: str, token: str | None) -> None:
        if token is None:
            setattr(self, f"{name}_id", None)
            return
        found = self.backend.token_to_id(token)
        if found is None:
            raise TokenizerError(f"{name} {token!r} is not in the vocabulary")
        setattr(self, f"{name}_id", found)

    bos_token = property(
        lambda self: self.token(self.bos_token_id), lambda self, t: self._set_token("bos_token", t)
    )
    eos_token = property(
        lambda self: self.token(self.eos_token_id), lambda self, t: self._set_token("eos_token", t)
    )
    pad_token = property(
        lambda self: self.token(self.pad_token_id), lambda self, t: self._set_token("pad_token", t)
    )
    unk_token = property(
        lambda self: self.token(self.unk_token_id), lambda self, t: self._set_token("unk_token", t)
    )
    mask_token = property(
        lambda self: self.token(self.mask_token_id), lambda self, t: self._set_token("mask_token", t)
    )

    def batch_encode(self, texts: list[str], *, add_special_tokens: bool = True) -> dict[str, Any]:
        """Padded (batch, length) tensors: `self(texts, padding=True, return_tensors="pt")`."""
        return self(texts, add_special_tokens=add_special_tokens, padding=True, return_tensors="pt")

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        tokens = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.backend.decode(tokens, skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, sequences: list[list[int]] | torch.Tensor, skip_special_tokens: bool = False
    ) -> list[str]:
        rows = sequences.tolist() if isinstance(sequences, torch.Tensor) else sequences
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]

    # ---- chat ------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = True,
        return_tensors: str | None = None,
        return_dict: bool = False,
        **template_kwargs: Any,
    ) -> Any:
        """The conversation through the chat template, as transformers renders it: `tools` and
        `documents` reach the template, as do extra keywords (`enable_thinking=False`);
        `continue_final_message` leaves the last message open for the model to continue; tokenized, the
        ids as a list, a tensor (`return_tensors`), or a BatchEncoding (`return_dict=True`)."""
        if not self.chat_template:
            raise TemplateError("this tokenizer has no chat template; pass plain text instead")
        text = render_chat(
            self.chat_template,
            conversation,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            bos_token=self.token(self.bos_token_id) or "",
            eos_token=self.token(self.eos_token_id) or "",
            **template_kwargs,
        )
        if not tokenize:
            return text
        encoded = self(text, add_special_tokens=False, return_tensors=return_tensors)
        return encoded if return_dict else encoded["input_ids"]


class AutoTokenizer:
    """The tokenizer of a checkpoint folder, hub id, or `.gguf` file."""

    @staticmethod
    def from_pretrained(path: str | os.PathLike, gguf_file: str | None = None, **kwargs: Any) -> Tokenizer:
        """`gguf_file`: a GGUF file in the folder (or `path` itself ending in .gguf) carries the tokenizer."""
        if gguf_file is not None or str(path).endswith(".gguf"):
            from .gguf import read_gguf_metadata

            file = Path(path) / kwargs.pop("subfolder", "") / gguf_file if gguf_file is not None else path
            tokenizer = Tokenizer.from_gguf_metadata(read_gguf_metadata(file))
            tokenizer.padding_side = kwargs.pop("padding_side", None) or tokenizer.padding_side
            return tokenizer
        return Tokenizer.from_pretrained(path, **kwargs)


PreTrainedTokenizerFast = Tokenizer  # the name transformers gives a fast tokenizer's class
