"""Task losses and pooling, computed the way Hugging Face computes them so losses match too."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy: position t predicts labels[t + 1]; -100 labels are ignored."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(logits.device)
    return F.cross_entropy(logits.float().flatten(0, -2), shifted.flatten(), ignore_index=IGNORE_INDEX)


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
