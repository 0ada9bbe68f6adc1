"""Task losses and pooling, computed the way Hugging Face computes them so losses match too."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross entropy: position t predicts labels[t + 1]; -100 labels are ignored. With
    `num_items_in_batch` the summed loss is divided by it (the label tokens of a whole accumulation window)."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(logits.device)
    flat_logits, flat_labels = logits.float().flatten(0, -2), shifted.flatten()
    if num_items_in_batch is None:
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)
    return (
        F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
        / num_items_in_batch
    )


def keep_last(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """Only the positions whose logits are wanted: the last `n` (0 keeps all), or explicit indices."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    return hidden[:, logits_to_keep]


def last_token(logits: torch.Tensor, input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Each sequence's logits at its rightmost non-padding token (works for left and right padding)."""
    batch = input_ids.shape[0]
    if pad_token_id is None:
        if batch != 1:
            raise ValueError("pooling a batch needs `pad_token_id` in the config to find each sequence's end")
        last = torch.full((1,), -1, device=logits.device)
    else:
        non_pad = (input_ids != pad_token_id).to(logits.device, torch.int32)
        positions = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
        last = (positions * non_pad).argmax(-1)
    return logits[torch.arange(batch, device=logits.device), last]


def sequence_classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_labels: int, problem_type: str | None
) -> torch.Tensor:
    """Regression (MSE), single-label (cross entropy) or multi-label (BCE), inferred as Hugging Face does."""
    labels = labels.to(logits.device)
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze().float(), labels.squeeze().float())
        return F.mse_loss(logits.float(), labels.float())
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels).float(), labels.view(-1))
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    raise ValueError(
        f"problem_type `{problem_type}`: expected regression, single_label_classification or "
        "multi_label_classification"
    )


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy per token; -100 labels (padding, sub-words) are ignored."""
    return F.cross_entropy(
        logits.flatten(0, -2).float(), labels.flatten().to(logits.device), ignore_index=IGNORE_INDEX
    )


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy at masked positions; every other position carries the label -100."""
    return token_classification_loss(logits, labels)


def multiple_choice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy over the choices, logits (batch, choices)."""
    return F.cross_entropy(logits.float(), labels.to(logits.device))


def question_answering_loss(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    start_positions: torch.Tensor,
    end_positions: torch.Tensor,
) -> torch.Tensor:
    """Mean of the start and end cross entropies. Positions outside the sequence are clamped to its length
    and ignored, as Hugging Face does for answers truncated away."""
    length = start_logits.shape[1]
    start = start_positions.reshape(-1).to(start_logits.device).clamp(0, length)
    end = end_positions.reshape(-1).to(end_logits.device).clamp(0, length)
    start_loss = F.cross_entropy(start_logits.float(), start, ignore_index=length)
    end_loss = F.cross_entropy(end_logits.float(), end, ignore_index=length)
    return (start_loss + end_loss) / 2
