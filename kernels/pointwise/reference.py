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


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation on a fused gate/up projection [..., 2I]: silu(gate) * up, each rounded to the dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def add_rms_norm_ref(h: torch.Tensor, y: torch.Tensor, scale: float, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual step and the norm after it: (h + y * scale, rms_norm(h + y * scale)), rounded as two ops."""
    h = h + y * scale
    return h, rms_norm_ref(h, weight, eps)


def gated_rms_norm_ref(out: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor) -> torch.Tensor:
    """A Lightning layer's output [T, H * D] from the recurrence's out [H, T, D] (fp32): in the gate's dtype,
    heads side by side, RMSNorm over all heads, times sigmoid(gate) [T, H * D]."""
    x = out.to(gate.dtype).transpose(0, 1).reshape(gate.shape[0], -1)
    return rms_norm_ref(x, weight, eps) * torch.sigmoid(gate)


def heads_gate_ref(out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """A sparse layer's attention output [H, T, D] (heads-first) as [T, H * D], times sigmoid(gate) [T, H * D]."""
    return out.transpose(0, 1).reshape(gate.shape[0], -1) * torch.sigmoid(gate)


def norm_rope_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
    """A per-head RMSNorm (q/k norm) of x [T, H, D], then RoPE: heads-first [H, T, D]."""
    return rope_ref(rms_norm_ref(x, weight, eps).transpose(0, 1), cos, sin)
