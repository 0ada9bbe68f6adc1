"""KV caches. The attention code sees one interface: `update(layer_idx, k, v) -> (all_k, all_v)`."""

from __future__ import annotations

import torch


class Cache:
    """Base interface for key/value caches (dynamic today; static, sliding and quantized build on it)."""

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def get_seq_length(self) -> int:
        raise NotImplementedError

    def reorder(self, rows: torch.Tensor) -> None:
        raise NotImplementedError


class DynamicCache(Cache):
    """Grows by concatenation: simple and exact, at the cost of a copy per step."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer_idx] = torch.cat((self.keys[layer_idx], k), dim=-2)
            self.values[layer_idx] = torch.cat((self.values[layer_idx], v), dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self) -> int:
        return self.keys[0].shape[-2] if self.keys else 0

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` positions (rejected speculative tokens)."""
        self.keys = [k[..., :length, :] for k in self.keys]
        self.values = [v[..., :length, :] for v in self.values]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep row `rows[i]` as row i (beam search follows its surviving beams)."""
        self.keys = [k.index_select(0, rows.to(k.device)) for k in self.keys]
        self.values = [v.index_select(0, rows.to(v.device)) for v in self.values]

    def __len__(self) -> int:
        return len(self.keys)
