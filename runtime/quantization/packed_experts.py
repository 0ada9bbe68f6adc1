"""A mixture's experts kept in a GGUF file's packed blocks.

`moe.Experts` holds every expert as float stacks (`gate_up_proj`, `down_proj`); a quantized file's expert
stacks would need a float copy of the model's largest tensors to fit them. `PackedExperts` keeps each
expert's gate, up and down projection as its own int8/int4 layer (views of the file's unpacked blocks)
and routes tokens as `Experts` does, so decoding reads only the chosen experts' packed bytes through the
packed kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from ..moe import Experts, run_experts


class PackedExperts(nn.Module):
    """Experts whose projections are layers of their own (`gate[e]`, `up[e]`, `down[e]`): placeholders
    here, which the quantized layers a checkpoint holds replace (`prepare_weight_only`)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act_fn: nn.Module) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = (
            num_experts,
            hidden_size,
            intermediate_size,
        )
        self.act_fn = act_fn

        def projections(inputs: int, outputs: int) -> nn.ModuleList:
            return nn.ModuleList(
                nn.Linear(inputs, outputs, bias=False, device="meta") for _ in range(num_experts)
            )

        self.gate = projections(hidden_size, intermediate_size)
        self.up = projections(hidden_size, intermediate_size)
        self.down = projections(intermediate_size, hidden_size)

    @classmethod
    def like(cls, experts: Experts) -> PackedExperts:
        return cls(experts.num_experts, experts.hidden_size, experts.intermediate_size, experts.act_fn)

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return run_experts(x, chosen, weights, self.num_experts, self.expert_mlp)

    def expert_mlp(self, rows: torch.Tensor, expert: int) -> torch.Tensor:
        return self.down[expert](self.act_fn(self.gate[expert](rows)) * self.up[expert](rows))

    def extra_repr(self) -> str:
        return f"{self.num_experts}, {self.hidden_size}, {self.intermediate_size}"
