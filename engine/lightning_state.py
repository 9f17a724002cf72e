"""The recurrent state of one Lightning (linear attention) layer: fixed size whatever the context length."""

from __future__ import annotations

from typing import ClassVar

import torch
from salachat.engine.cache import register_cache
from salachat.kernels import lightning_attention


@register_cache
class LightningState:
    """S [heads, head_dim_k, head_dim_v] in fp32 (states accumulate in fp32 whatever the activations)."""

    kind: ClassVar[str] = "lightning"

    def __init__(self, heads: int, head_dim: int, device: torch.device | str):
        self.recurrent = torch.zeros(heads, head_dim, head_dim, dtype=torch.float32, device=device)
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    def step(self, q, k, v, log_decay: torch.Tensor, scale: float) -> torch.Tensor:
        """Run q, k, v [H, T, D] through the recurrence from the current state; keep the new state."""
        out, new = lightning_attention(q, k, v, log_decay, scale, self.recurrent, update_state=True)
        if new is not self.recurrent:
            self.recurrent.copy_(new)  # in place: a decode CUDA graph holds this tensor's address
        self._length += q.shape[1]
        return out

    def state(self) -> dict[str, torch.Tensor]:
        return {"recurrent": self.recurrent}

    def meta(self) -> dict:
        return {"length": self._length}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> LightningState:
        recurrent = tensors["recurrent"]
        if recurrent.dim() != 3 or recurrent.shape[1] != recurrent.shape[2] or recurrent.dtype != torch.float32:
            raise ValueError(f"lightning state has shape {tuple(recurrent.shape)} and dtype {recurrent.dtype}")
        state = cls(recurrent.shape[0], recurrent.shape[1], recurrent.device)
        state.recurrent = recurrent.clone()
        state._length = int(meta["length"])
        return state
