"""Token embeddings looked up in a packed int8/int4 matrix.

A GGUF file whose output projection is tied to its token embedding stores one table of packed blocks;
llama.cpp multiplies with it and looks rows up in it. The tied head here keeps those blocks
(`Int8Linear` / `Int4Linear`), and `PackedEmbedding` reads its rows from the same tensors, dequantising
only the rows a batch looks up: no float copy of the largest matrix of a small model (SmolLM2's is 113 MB
in float32, more than the rest of its Q4_1 file).
"""

from __future__ import annotations

import torch
from torch import nn

from .weight_only import Int4Linear, Int8Linear


class PackedEmbedding(nn.Module):
    """`embedding(ids)` as rows of a packed layer's weight, in `dtype`, times `scale` when given (as
    `layers.Embedding` scales). The layer is referenced, not owned: its tensors stay the head's."""

    def __init__(
        self,
        table: Int8Linear | Int4Linear,
        dtype: torch.dtype,
        padding_idx: int | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        self._table = (table,)  # a tuple: not a submodule, so its parameters have one owner, the head
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.dtype, self.padding_idx, self.scale = dtype, padding_idx, scale

    @property
    def table(self) -> Int8Linear | Int4Linear:
        return self._table[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.dequantize(ids.reshape(-1)).to(self.dtype).view(*ids.shape, self.embedding_dim)
        if self.scale is None:
            return rows
        return rows * torch.tensor(self.scale, dtype=rows.dtype)

    def extra_repr(self) -> str:
        scale = f", scale={self.scale}" if self.scale is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of {type(self.table).__name__}{scale}"
