"""Mixtures of experts: a router that picks each token's experts, and a stack of experts that runs only
the chosen ones.

`Router` scores the experts with one linear map (its weight is the checkpoint's `gate.weight`), keeps each
token's `top_k` by softmax probability and returns their weights and indices; the logits are what the
load-balancing loss reads (`output_router_logits`). `Experts` holds every expert's gated MLP as stacked
3-D tensors (`gate_up_proj` (E, 2I, H), `down_proj` (E, H, I)), the layout transformers 5 keeps in
memory, and multiplies each expert's weights once per call, by the rows routed to it: tokens are sorted
by expert, so a prompt's rows meet each expert's weights in one matmul and a decoding step reads only the
`top_k` experts it chose.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .kernels import DECODE_ROWS
from .layers import activation


class Router(nn.Linear):
    """Each token's top_k experts and their weights: softmax over `x W^T` (computed in float32), the
    top_k kept and, with `normalize`, rescaled to sum to one."""

    def __init__(self, in_features: int, num_experts: int, top_k: int, normalize: bool = False) -> None:
        super().__init__(in_features, num_experts, bias=False)
        self.top_k, self.normalize = top_k, normalize
        self.recorded: list[torch.Tensor] | None = None  # set while `output_router_logits` collects

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        logits = super().forward(x)
        if self.recorded is not None:
            self.recorded.append(logits.reshape(-1, self.out_features))
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), chosen

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, top_k={self.top_k}, normalize={self.normalize}"


class Experts(nn.Module):
    """`num_experts` gated MLPs, down(act(gate(x)) * up(x)), applied to the tokens routed to each and
    summed with their routing weights."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        act: str = "silu",
        per_expert: tuple[str, str, str] | list[str] = ("gate_proj", "up_proj", "down_proj"),
    ) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = (
            num_experts,
            hidden_size,
            intermediate_size,
        )
        # what checkpoints that store each expert apart call its gate, up and down projections
        self.per_expert = tuple(per_expert)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act_fn = activation(act)
        # expert parallelism (`keep_experts`): this rank's experts, and the group that sums the outputs
        self.first_expert, self.local_experts, self.group = 0, num_experts, None
        self.adapter: nn.Module | None = None  # low-rank updates of each expert (LoRA), when training them

    def keep_experts(self, first: int, count: int, group: Any) -> None:
        """Hold experts first..first + count - 1 only (expert parallelism): each rank runs its experts on
        the tokens routed to them, and the ranks' outputs are summed after every call."""
        self.first_expert, self.local_experts, self.group = first, count, group
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(self, name)
            setattr(
                self,
                name,
                nn.Parameter(full[first : first + count].clone(), requires_grad=full.requires_grad),
            )

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.gate_up_proj, mean=0.0, std=std)
        nn.init.normal_(self.down_proj, mean=0.0, std=std)

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = run_experts(
            x, chosen, weights, self.num_experts, self.expert_mlp, self.first_expert, self.local_experts
        )
        if self.group is not None:
            import torch.distributed as dist

            dist.all_reduce(out, group=self.group)
        return out

    def expert_mlp(self, rows: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert `expert`'s (this rank's numbering) gated MLP of `rows`."""
        gate, up = _linear(rows, self.weight("gate_up_proj", expert)).chunk(2, dim=-1)
        return _linear(self.act_fn(gate) * up, self.weight("down_proj", expert))

    def weight(self, name: str, expert: int) -> torch.Tensor:
        """One expert's `gate_up_proj` or `down_proj` matrix, with its adapter's update when there is one."""
        base = getattr(self, name)[expert]
        return base if self.adapter is None else base + self.adapter.delta(name, expert).to(base.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_experts}, {self.hidden_size}, {self.intermediate_size}"


def run_experts(
    x: torch.Tensor,
    chosen: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    expert_mlp: Callable[[torch.Tensor, int], torch.Tensor],
    first: int = 0,
    count: int | None = None,
) -> torch.Tensor:
    """Every token's chosen experts' outputs, weighted and summed: tokens sorted by expert, so each
    expert's weights meet all its rows in one product, and an expert nobody chose (or another rank's:
    outside first..first + count - 1) is never read."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    top_k = chosen.shape[-1]
    picks = chosen.reshape(-1)  # (tokens * top_k,): token t's j-th expert at t * top_k + j
    order = picks.argsort(stable=True)
    counts = torch.bincount(picks, minlength=num_experts).tolist()  # one host sync per call
    token_of = order // top_k
    scale = weights.reshape(-1)[order, None]
    out = torch.zeros_like(rows)
    start = 0
    for expert, picked in enumerate(counts):
        local = expert - first
        if picked and 0 <= local < (num_experts if count is None else count):
            tokens = token_of[start : start + picked]
            y = expert_mlp(rows[tokens], local)
            out.index_add_(0, tokens, (y * scale[start : start + picked]).to(out.dtype))
        start += picked
    return out.view(shape)


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T for one expert. A decoding step's few rows stream the expert's weights through the C++ GEMV,
    which reads them at ~1.5-2x the bandwidth of torch's float32 GEMV on a 2-core AMD EPYC
    (`bench/moe.py`); its sums run in another order, so results agree to float rounding, not bit for bit."""
    if x.shape[0] <= DECODE_ROWS and cpu_kernels.applies(x, weight):
        return cpu_kernels.linear(x, weight, None)
    return F.linear(x, weight)


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, as transformers computes it: num_experts times the sum over
    experts of (share of top_k picks routed there) x (mean router probability), over every layer's
    tokens (padding excluded when `attention_mask` is given)."""
    logits = torch.cat([layer.to(router_logits[0].device) for layer in router_logits], dim=0)
    num_experts = logits.shape[-1]
    probs = logits.softmax(dim=-1)
    _, chosen = probs.topk(top_k, dim=-1)
    picked = F.one_hot(chosen, num_experts).float()  # (layers * tokens, top_k, experts)
    if attention_mask is None:
        tokens_per_expert = picked.mean(dim=0)
        prob_per_expert = probs.mean(dim=0)
    else:
        layers = logits.shape[0] // attention_mask.numel()
        keep = attention_mask.reshape(1, -1).expand(layers, -1).reshape(-1).to(probs)  # (layers * tokens,)
        tokens_per_expert = (picked * keep[:, None, None]).sum(0) / keep.sum()
        prob_per_expert = (probs * keep[:, None]).sum(0) / keep.sum()
    return (tokens_per_expert * prob_per_expert[None]).sum() * num_experts
