"""What each task head adds around the spec's forward: extra inputs, the loss, the output type.

The spec's head forward computes the task's outputs (`TASKS` in the primitives, e.g. start and end logits
for question answering); this table says how the generated head turns them into a loss and an output.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    output: str  # output class in specformer.runtime.outputs
    labels: tuple[str, ...] = ()  # extra forward inputs, each `Tensor | None = None`
    loss: str | None = None  # loss expression over the outputs and labels (`self.config` in scope)
    loss_function: str | None = None  # what `loss` calls, imported from specformer.runtime.losses


TASK_EMISSION: dict[str, Task] = {
    "causal_lm": Task(
        "CausalLMOutput", ("labels",), "causal_lm_loss(logits, labels, num_items_in_batch)", "causal_lm_loss"
    ),
    "sequence_classification": Task(
        "SequenceClassifierOutput",
        ("labels",),
        "sequence_classification_loss(logits, labels, self.config.num_labels, self.config.problem_type)",
        "sequence_classification_loss",
    ),
    "token_classification": Task(
        "TokenClassifierOutput",
        ("labels",),
        "token_classification_loss(logits, labels)",
        "token_classification_loss",
    ),
    "question_answering": Task(
        "QuestionAnsweringOutput",
        ("start_positions", "end_positions"),
        "question_answering_loss(start_logits, end_logits, start_positions, end_positions)",
        "question_answering_loss",
    ),
    "masked_lm": Task("MaskedLMOutput", ("labels",), "masked_lm_loss(logits, labels)", "masked_lm_loss"),
    "multiple_choice": Task(
        "MultipleChoiceOutput", ("labels",), "multiple_choice_loss(logits, labels)", "multiple_choice_loss"
    ),
    "dense_embedding": Task("DenseEmbeddingOutput"),
    "span_reader": Task("SpanReaderOutput"),
}
