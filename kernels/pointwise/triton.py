"""RMSNorm and rotary embedding as one Triton kernel each (see reference.py for what they compute)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from salachat.kernels.pointwise.reference import rms_norm_ref


@triton.jit(do_not_specialize=["rows"])
def _rms_norm_kernel(X, W, Y, rows, n, eps, sx, sy, BN: tl.constexpr, ROWS: tl.constexpr):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BN)
    ok = (row[:, None] < rows) & (cols[None, :] < n)
    x = tl.load(X + row[:, None] * sx + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    normed = x * tl.rsqrt(tl.sum(x * x, 1) / n + eps)[:, None]
    normed = normed.to(X.dtype.element_ty).to(tl.float32)  # round to the activation dtype before the scale
    w = tl.load(W + cols, mask=cols < n, other=0.0).to(tl.float32)
    tl.store(Y + row[:, None] * sy + cols[None, :], (normed * w[None, :]).to(Y.dtype.element_ty), mask=ok)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    n = x.shape[-1]
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if n > 16384 or x.stride(-1) != 1:
        return rms_norm_ref(x, weight, eps)
    x2 = x.reshape(-1, n)  # a view for the layouts the model makes (rows of a contiguous last dim)
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    bn = triton.next_power_of_2(n)
    per = max(1, min(16, 4096 // bn))  # short rows (head-dim norms): several a program
    _rms_norm_kernel[(triton.cdiv(x2.shape[0], per),)](x2, weight, y, x2.shape[0], n, float(eps), x2.stride(0),
                                                        y.stride(0), BN=bn, ROWS=per)
    return y.view(x.shape)


@triton.jit(do_not_specialize=["t"])
def _rope_kernel(X, COS, SIN, Y, t, sxh, sxt, BT: tl.constexpr, D: tl.constexpr):
    h, tile = tl.program_id(0), tl.program_id(1)
    rows = tile * BT + tl.arange(0, BT)
    cols = tl.arange(0, D)
    half = D // 2
    ok = rows[:, None] < t
    x = tl.load(X + h * sxh + rows[:, None] * sxt + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    partner = tl.where(cols < half, cols + half, cols - half)
    other = tl.load(X + h * sxh + rows[:, None] * sxt + partner[None, :], mask=ok, other=0.0).to(tl.float32)
    rotated = tl.where(cols[None, :] < half, -other, other)
    cos = tl.load(COS + rows[:, None] * D + cols[None, :], mask=ok, other=0.0)
    sin = tl.load(SIN + rows[:, None] * D + cols[None, :], mask=ok, other=0.0)
    # two products rounded to fp32 then added, as the reference does (no fused multiply-add)
    y = tl.fma(x, cos, 0.0) + tl.fma(rotated, sin, 0.0)
    tl.store(Y + (h * t + rows[:, None]) * D + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    heads, t, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    y = torch.empty(heads, t, d, dtype=x.dtype, device=x.device)
    bt = max(1, min(64, 4096 // d))
    _rope_kernel[(heads, triton.cdiv(t, bt))](x, cos, sin, y, t, x.stride(0), x.stride(1), BT=bt, D=d)
    return y
