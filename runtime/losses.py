"""Task losses and pooling, computed the way Hugging Face computes them so losses match too."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import is_plain_linear

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**25  # logits per chunk of the fused loss: 128 MB in float32, whatever the vocabulary


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


def linear_cross_entropy(
    hidden: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """`causal_lm_loss(head(hidden), labels, num_items_in_batch)` for training, without the logits.

    The (tokens x vocab) logits, their log-softmax and their gradient are the biggest tensors of a
    language model's training step and cost more in memory traffic than in arithmetic. Here the head's
    matmul and the cross entropy run chunk by chunk, and each chunk's logits are turned into their
    gradient in place, so no full-size tensor is ever built. Heads that are not a plain `nn.Linear`
    (LoRA, quantized or tensor-parallel layers) and autocast steps take the unfused path.
    """
    weight = head.weight if is_plain_linear(head) else None
    fusable = (
        weight is not None
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled(hidden.device.type)
        and type(weight.data) is torch.Tensor  # not a DTensor shard
    )
    if not fusable:
        return causal_lm_loss(head(hidden), labels, num_items_in_batch)
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(hidden.device).flatten()
    total = _eager_fused_sum()(hidden.flatten(0, -2), weight, head.bias, shifted)
    if num_items_in_batch is None:  # a mean over the kept labels; with none, F.cross_entropy's NaN
        count = (shifted != IGNORE_INDEX).sum()
        return torch.where(count > 0, total / count.clamp(min=1), torch.nan)
    return total / num_items_in_batch


@functools.cache
def _eager_fused_sum() -> Callable[..., torch.Tensor]:
    """The fused loss, kept out of compiled graphs: traced, its chunk loop ran slower than eager. Made on
    first use because `torch.compiler.disable` imports torch._dynamo, too heavy for `import specformer`."""
    return torch.compiler.disable(_LinearCrossEntropy.apply)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross entropy of `hidden @ weight.T + bias` against `labels`; the gradients are computed in
    the forward pass (each chunk's softmax minus one-hot is its logits' gradient) and scaled in backward."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        rows, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(1, min(rows, CHUNK_ELEMENTS // vocab))
        # only the gradients autograd will ask for (a frozen head, e.g. under LoRA, needs none of its own)
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.empty_like(weight) if needs_weight else None
        grad_bias = torch.zeros_like(bias) if bias is not None and needs_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        buffer = _workspace(chunk * vocab, hidden.device).view(chunk, vocab)
        for start in range(0, rows, chunk):
            h, target = hidden[start : start + chunk], labels[start : start + chunk]
            logits = buffer[: len(h)]
            if hidden.dtype == torch.float32:
                torch.mm(h, weight.t(), out=logits)
            else:
                logits.copy_(h @ weight.t())
            if bias is not None:
                logits += bias.float()
            kept = (target != IGNORE_INDEX).to(torch.float32)[:, None]
            index = target.clamp(min=0)[:, None]
            # log-sum-exp with the row maximum taken out; the logits become exp(logit - max) in place
            peak = logits.amax(dim=-1, keepdim=True)
            picked = logits.gather(1, index)
            probs = logits.sub_(peak).exp_()
            norm = probs.sum(dim=-1, keepdim=True)
            total += ((norm.log() + peak - picked) * kept).sum()
            # d(loss)/d(logits) = softmax - one_hot, zero for ignored positions
            grad = probs.mul_(kept / norm).scatter_add_(1, index, -kept).to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[start : start + chunk])
            if grad_weight is not None:
                if start == 0:
                    torch.mm(grad.t(), h, out=grad_weight)
                else:
                    grad_weight.addmm_(grad.t(), h)
            if grad_bias is not None:
                grad_bias += grad.sum(dim=0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.used = False
        return total

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        if ctx.used:
            raise RuntimeError("the fused causal-LM loss can be differentiated once (no retain_graph)")
        ctx.used = True
        # scaled in place: these gradients are this function's own, and a head's weight gradient is big
        scale = grad_output.to(torch.float32)
        return (*(g.mul_(scale.to(g.dtype)) if g is not None else None for g in ctx.saved_tensors), None)


_workspaces = threading.local()


def _workspace(numel: int, device: torch.device) -> torch.Tensor:
    """A float32 scratch buffer of at least `numel` elements, kept between training steps: a fresh buffer
    this size would be page-faulted in again every step, which costs as much as a third of its matmul."""
    if device.type != "cpu":  # accelerator allocators already reuse freed blocks
        return torch.empty(numel, dtype=torch.float32, device=device)
    kept: dict[torch.device, torch.Tensor] = _workspaces.__dict__.setdefault("buffers", {})
    buffer = kept.get(device)
    if buffer is None or buffer.numel() < numel:
        buffer = kept[device] = torch.empty(numel, dtype=torch.float32, device=device)
    return buffer[:numel]


def keep_last(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """Only the positions whose logits are wanted: the last `n` (0 keeps all), or explicit indices."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    return hidden[:, logits_to_keep]


def mean_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Each sequence's mean hidden state over its non-padding positions (B, T, D) -> (B, D)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1)


def token_at(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Row i of `x` (rows, length, ...) at position index[i] (flattened, so (batch, choices) indices match
    rows of choices); each row's last position when `index` is None."""
    if index is None:
        return x[:, -1]
    index = index.reshape(-1).to(x.device)
    if index.shape[0] != x.shape[0]:
        raise ValueError(
            f"{index.shape[0]} positions for {x.shape[0]} rows; expected one per row (or choice)"
        )
    return x[torch.arange(x.shape[0], device=x.device), index]


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
