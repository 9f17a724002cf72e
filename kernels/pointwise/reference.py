"""The per-token operations around the attention: RMSNorm and rotary embedding (the definitions).

Each is a handful of PyTorch ops; at decode every op is a kernel of a microsecond or two, and a 32-layer model
runs hundreds of them per token, so `triton.py` fuses each into one kernel with the same rounding.
"""

from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise the last dim in fp32, round back to x's dtype, then scale by weight: HF's rounding order."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX / rotate_half RoPE on x [heads, T, D] in fp32 (cos, sin: [T, D] fp32), returned in x's dtype."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)
