"""BatchEncoding: what a tokenizer call returns, as transformers' users handle it: a dict of
`input_ids`, `attention_mask` (and `token_type_ids`) that also reads by attribute and moves its tensors
with `.to(device)`, so `model(**tokenizer(text, return_tensors="pt").to(device))` works."""

from __future__ import annotations

from typing import Any

import torch


class BatchEncoding(dict):
    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no {name!r}; it holds {', '.join(self)}") from None

    def to(self, device: str | torch.device) -> BatchEncoding:
        """The tensors moved to `device` (in place, as transformers does); other values stay."""
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self

    def convert_to_tensors(self, tensor_type: str | None) -> BatchEncoding:
        if tensor_type is None:
            return self
        if tensor_type not in ("pt", "np"):
            raise ValueError(f"return_tensors={tensor_type!r}; expected 'pt', 'np' or None")
        if tensor_type == "np":
            import numpy as np  # only asked for here; torch alone does not need it

            self.update({key: np.asarray(value, dtype=np.int64) for key, value in self.items()})
        else:
            self.update({key: torch.tensor(value, dtype=torch.long) for key, value in self.items()})
        return self
