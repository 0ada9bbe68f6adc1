"""`pipeline(task, model)`: transformers' task pipelines, with its call conventions and output formats, over
specformer's models and tokenizers: text-generation (prompts or chat messages, streaming), fill-mask,
text-classification, token-classification (with word aggregation), question-answering and
feature-extraction."""

from __future__ import annotations

import inspect
import os
from typing import Any, ClassVar

import torch

from specformer.dsl.errors import did_you_mean

from .errors import ArgumentError


class Pipeline:
    model_class: str  # the Auto class that loads this task's model

    def __init__(self, model: Any, tokenizer: Any, device: str | torch.device | None = None) -> None:
        self.model = model.eval() if device is None else model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device

    def __call__(self, inputs: Any, **options: Any) -> Any:
        if isinstance(inputs, list) and not _is_chat(inputs):
            return [self.one(item, **options) for item in inputs]
        return self.one(inputs, **options)

    def one(self, inputs: Any, **options: Any) -> Any:
        raise NotImplementedError  # each task below

    def _encode(self, *texts: str, **kwargs: Any) -> Any:
        return self.tokenizer(*texts, return_tensors="pt", **kwargs).to(self.device)

    def _forward(self, encoded: Any) -> Any:
        """The model on the encoded inputs it takes (a BERT tokenizer's token_type_ids are dropped for a
        model without token types, as transformers' models ignore them)."""
        accepted = inspect.signature(self.model.forward).parameters
        with torch.no_grad():
            return self.model(**{k: v for k, v in encoded.items() if k in accepted})


def _is_chat(value: Any) -> bool:
    return bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


class TextGenerationPipeline(Pipeline):
    model_class = "AutoModelForCausalLM"

    def __call__(self, inputs: Any, **options: Any) -> Any:
        if isinstance(inputs, list) and inputs and isinstance(inputs[0], list):  # a batch of chats
            return [self.one(chat, **options) for chat in inputs]
        return super().__call__(inputs, **options)

    # transformers' defaults for free-form generation, where neither the call nor the model's generation
    # config says otherwise
    DEFAULTS: ClassVar[dict[str, Any]] = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}

    def one(
        self,
        inputs: Any,
        return_full_text: bool = True,
        continue_final_message: bool | None = None,
        add_special_tokens: bool = False,
        skip_special_tokens: bool = True,
        **generate: Any,
    ) -> list[dict[str, Any]]:
        """A prompt continued, or a chat (a list of messages) answered by the assistant (or its final
        assistant message continued); `streamer=` and other generate() keywords pass through."""
        from .generation.config import GenerationConfig

        chosen, plain = self.model.generation_config, GenerationConfig()
        defaults = {
            k: v
            for k, v in self.DEFAULTS.items()
            if k not in generate and getattr(chosen, k) == getattr(plain, k)
        }
        if not generate.get("do_sample", defaults.get("do_sample", chosen.do_sample)):
            defaults.pop("temperature", None)  # a sampling setting, meaningless for greedy decoding
        generate |= defaults
        if self.tokenizer.pad_token_id is not None:
            generate.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        chat = _is_chat(inputs)
        if chat:
            if continue_final_message is None:
                continue_final_message = inputs[-1]["role"] == "assistant"
            encoded = self.tokenizer.apply_chat_template(
                inputs,
                add_generation_prompt=not continue_final_message,
                continue_final_message=continue_final_message,
                return_dict=True,
                return_tensors="pt",
            ).to(self.device)
        else:
            encoded = self._encode(inputs, add_special_tokens=add_special_tokens)
        prompt_length = encoded["input_ids"].shape[1]
        with torch.no_grad():
            out = self.model.generate(**encoded, **generate)
        results = []
        for row in out:
            new = self.tokenizer.decode(row[prompt_length:], skip_special_tokens=skip_special_tokens)
            if not return_full_text:
                results.append({"generated_text": new})
            elif not chat:
                results.append({"generated_text": inputs + new})
            elif continue_final_message:
                last = inputs[-1]
                results.append({"generated_text": [*inputs[:-1], last | {"content": last["content"] + new}]})
            else:
                results.append({"generated_text": [*inputs, {"role": "assistant", "content": new}]})
        return results


class TextClassificationPipeline(Pipeline):
    model_class = "AutoModelForSequenceClassification"
    _NOT_GIVEN = object()

    def __call__(self, inputs: Any, **options: Any) -> Any:
        results = super().__call__(inputs, **options)
        return results if isinstance(inputs, list) or "top_k" in options else [results]

    def one(self, inputs: str, top_k: Any = _NOT_GIVEN, function_to_apply: str | None = None) -> Any:
        """The best label and its score ({"label", "score"}); `top_k=None` gives every label, best first."""
        logits = self._forward(self._encode(inputs)).logits[0].float()
        config = self.model.config
        apply = function_to_apply or (
            "sigmoid"
            if config.num_labels == 1 or config.problem_type == "multi_label_classification"
            else "softmax"
        )
        scores = {"sigmoid": logits.sigmoid, "softmax": lambda: logits.softmax(-1), "none": lambda: logits}[
            apply
        ]()
        ranked = [
            {"label": config.id2label[int(i)], "score": float(scores[i])}
            for i in scores.argsort(descending=True)
        ]
        if top_k is self._NOT_GIVEN:
            return ranked[0]
        return ranked if top_k is None else ranked[:top_k]


class FeatureExtractionPipeline(Pipeline):
    model_class = "AutoModel"

    def one(self, inputs: str, return_tensors: bool = False) -> Any:
        """Every token's last hidden state: [[vector per token]] (one batch row), or a tensor."""
        hidden = self._forward(self._encode(inputs))[0]
        return hidden if return_tensors else hidden.tolist()


class FillMaskPipeline(Pipeline):
    model_class = "AutoModelForMaskedLM"

    def one(self, inputs: str, top_k: int = 5) -> list[dict[str, Any]]:
        """The `top_k` fillers of the mask token: {"score", "token", "token_str", "sequence"}."""
        mask_id = self.tokenizer.mask_token_id
        if mask_id is None:
            raise ArgumentError("fill-mask needs a tokenizer with a mask token")
        encoded = self._encode(inputs)
        ids = encoded["input_ids"][0]
        where = (ids == mask_id).nonzero().flatten()
        if len(where) != 1:
            raise ArgumentError(
                f"fill-mask takes one {self.tokenizer.mask_token} per text; found {len(where)}"
            )
        probs = self._forward(encoded).logits[0, where[0]].float().softmax(-1)
        values, tokens = probs.topk(top_k)
        results = []
        for score, token in zip(values.tolist(), tokens.tolist(), strict=True):
            filled = ids.clone()
            filled[where[0]] = token
            results.append(
                {
                    "score": score,
                    "token": token,
                    "token_str": self.tokenizer.decode([token]),
                    "sequence": self.tokenizer.decode(filled, skip_special_tokens=True),
                }
            )
        return results


class TokenClassificationPipeline(Pipeline):
    model_class = "AutoModelForTokenClassification"

    def one(self, inputs: str, aggregation_strategy: str = "none", ignore_labels: Any = None) -> Any:
        """Tokens (or, aggregated, words and entities) with a label other than "O"."""
        strategies = ("none", "simple", "first", "average", "max")
        if aggregation_strategy not in strategies:
            raise ArgumentError(
                f"aggregation_strategy is {aggregation_strategy!r}; expected one of {strategies}"
            )
        found = self.tokenizer.backend.encode(inputs)
        encoded = self._encode(inputs)
        probs = self._forward(encoded).logits[0].float().softmax(-1)
        labels = self.model.config.id2label
        specials = found.special_tokens_mask
        tokens = []
        for index, (token_id, (start, end)) in enumerate(zip(found.ids, found.offsets, strict=True)):
            if specials[index]:
                continue
            word = self.tokenizer.token(token_id)
            # a token that continues a word starts where the previous one ended (a "##" piece)
            is_subword = bool(tokens) and tokens[-1]["end"] == start and start > 0
            tokens.append(
                {
                    "index": index,
                    "id": token_id,
                    "word": word,
                    "start": start,
                    "end": end,
                    "scores": probs[index],
                    "is_subword": is_subword,
                }
            )
        ignore = ["O"] if ignore_labels is None else ignore_labels
        if aggregation_strategy == "none":
            out = []
            for t in tokens:
                best = int(t["scores"].argmax())
                entity = {
                    "entity": labels[best],
                    "score": float(t["scores"][best]),
                    "index": t["index"],
                    "word": t["word"],
                    "start": t["start"],
                    "end": t["end"],
                }
                if entity["entity"] not in ignore:
                    out.append(entity)
            return out
        if aggregation_strategy != "simple":
            tokens = self._words(tokens, aggregation_strategy)
        return [g for g in self._groups(tokens, inputs) if g["entity_group"] not in ignore]

    def _words(self, tokens: list[dict[str, Any]], strategy: str) -> list[dict[str, Any]]:
        """Whole words: a label per word from its first token, the average, or the most confident one."""
        words: list[list[dict[str, Any]]] = []
        for t in tokens:
            if t["is_subword"] and words:
                words[-1].append(t)
            else:
                words.append([t])
        merged = []
        for pieces in words:
            if strategy == "first":
                scores = pieces[0]["scores"]
            elif strategy == "average":
                scores = torch.stack([p["scores"] for p in pieces]).mean(0)
            else:
                scores = max((p["scores"] for p in pieces), key=lambda s: float(s.max()))
            merged.append(
                pieces[0] | {"scores": scores, "end": pieces[-1]["end"], "ids": [p["id"] for p in pieces]}
            )
        return merged

    def _groups(self, tokens: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
        """Adjacent tokens of one entity type (B- starts one, I- continues it) as one group."""
        labels = self.model.config.id2label
        groups: list[dict[str, Any]] = []
        for t in tokens:
            best = int(t["scores"].argmax())
            label = labels[best]
            tag, _, kind = label.partition("-") if "-" in label else ("", "", label)
            score = float(t["scores"][best])
            ids = t.get("ids", [t["id"]])
            if groups and tag != "B" and groups[-1]["entity_group"] == kind:
                group = groups[-1]
                group["scores"].append(score)
                group["ids"] += ids
                group["end"] = t["end"]
            else:
                groups.append(
                    {
                        "entity_group": kind,
                        "scores": [score],
                        "ids": list(ids),
                        "start": t["start"],
                        "end": t["end"],
                    }
                )
        return [
            {
                "entity_group": g["entity_group"],
                "score": sum(g["scores"]) / len(g["scores"]),
                "word": self.tokenizer.decode(g["ids"]),
                "start": g["start"],
                "end": g["end"],
            }
            for g in groups
        ]


class QuestionAnsweringPipeline(Pipeline):
    model_class = "AutoModelForQuestionAnswering"

    def __call__(self, *args: Any, **options: Any) -> Any:
        if args and isinstance(args[0], dict):
            options = args[0] | options
        elif len(args) == 2:
            options |= {"question": args[0], "context": args[1]}
        return self.one(**options)

    def one(
        self, question: str, context: str, top_k: int = 1, max_answer_len: int = 15, max_seq_len: int = 384
    ) -> Any:
        """The best span of `context` answering `question`: {"score", "start", "end", "answer"}."""
        found = self.tokenizer.backend.encode(question, context)
        encoded = self._encode(question, context, truncation="only_second", max_length=max_seq_len)
        out = self._forward(encoded)
        in_context = torch.tensor([s == 1 for s in found.sequence_ids[: encoded["input_ids"].shape[1]]])
        start, end = out.start_logits[0].float(), out.end_logits[0].float()
        start = start.masked_fill(~in_context, -10000.0).softmax(-1)
        end = end.masked_fill(~in_context, -10000.0).softmax(-1)
        spans = torch.triu(start[:, None] * end[None, :]).tril(max_answer_len - 1)
        scores, flat = spans.flatten().topk(top_k)
        answers = []
        for score, index in zip(scores.tolist(), flat.tolist(), strict=True):
            first, last = divmod(index, spans.shape[1])
            begin, finish = found.offsets[first][0], found.offsets[last][1]
            answers.append({"score": score, "start": begin, "end": finish, "answer": context[begin:finish]})
        return answers[0] if top_k == 1 else answers


TASKS: dict[str, type[Pipeline]] = {
    "text-generation": TextGenerationPipeline,
    "text-classification": TextClassificationPipeline,
    "sentiment-analysis": TextClassificationPipeline,
    "feature-extraction": FeatureExtractionPipeline,
    "fill-mask": FillMaskPipeline,
    "token-classification": TokenClassificationPipeline,
    "ner": TokenClassificationPipeline,
    "question-answering": QuestionAnsweringPipeline,
}


def pipeline(
    task: str,
    model: str | os.PathLike | Any = None,
    tokenizer: str | os.PathLike | Any = None,
    device: str | torch.device | None = None,
    **model_kwargs: Any,
) -> Pipeline:
    """A task pipeline, as `transformers.pipeline`: `model` is a checkpoint (folder or hub id) or a loaded
    model; `tokenizer` defaults to the model's checkpoint; `model_kwargs` go to from_pretrained
    (`dtype`, `attn_implementation`, ...)."""
    from . import auto
    from .tokenizer import AutoTokenizer

    if task not in TASKS:
        raise ArgumentError(
            f"unknown pipeline task `{task}`{did_you_mean(task, TASKS)}; tasks: {', '.join(TASKS)}"
        )
    if model is None:
        raise ArgumentError(
            "pipeline() needs a model: a checkpoint folder, hub id or loaded model (no default)"
        )
    kind = TASKS[task]
    if isinstance(model, str | os.PathLike):
        tokenizer = model if tokenizer is None else tokenizer
        model = getattr(auto, kind.model_class).from_pretrained(model, **model_kwargs)
    if tokenizer is None:
        raise ArgumentError("pipeline() needs a tokenizer when the model is given as an object")
    if isinstance(tokenizer, str | os.PathLike):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return kind(model, tokenizer, device)
