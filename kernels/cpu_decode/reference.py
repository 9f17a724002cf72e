"""One query token's attention over a KV cache (the definition): softmax(q k^T * scale) v in float64."""

from __future__ import annotations

import torch


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Hkv, G, D] (a KV group's G query heads as rows), k, v [Hkv, L, D]: fp32 [Hkv, G, D]."""
    scores = torch.einsum("hgd,hld->hgl", q.double(), k.double()) * scale
    return torch.einsum("hgl,hld->hgd", torch.softmax(scores, dim=-1), v.double()).float()
