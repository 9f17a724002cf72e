"""RMSNorm, rotary embedding, SwiGLU's activation, the residual step with its norm and the Lightning output's
gated norm, as one Triton kernel each (see reference.py for what they compute). Each rounds where its reference
rounds; exp and division are the correctly rounded libdevice ones torch's kernels use, not Triton's fast ones."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from salachat.kernels.pointwise.reference import (
    add_rms_norm_ref,
    gated_rms_norm_ref,
    heads_gate_ref,
    norm_rope_ref,
    rms_norm_ref,
)
from triton.language.extra import libdevice

# torch's kernels take expf (libdevice's); the CPU interpreter has no libdevice, and its tl.exp is numpy's
_LIBDEVICE = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def _exp(x):
    if _LIBDEVICE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _rms_rows(x, W, cols, n, eps, dtype: tl.constexpr):
    """RMSNorm of the rows of x [R, BN] (fp32, zero past n) times the weight, rounded as the reference rounds:
    normalised in fp32, to the activation dtype, then scaled (the product in fp32, for the caller to store)."""
    normed = x * tl.rsqrt(tl.sum(x * x, 1) / n + eps)[:, None]
    normed = normed.to(dtype).to(tl.float32)  # round to the activation dtype before the scale
    return normed * tl.load(W + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]


@triton.jit(do_not_specialize=["rows"])
def _rms_norm_kernel(X, W, Y, rows, n, eps, sx, sy, BN: tl.constexpr, ROWS: tl.constexpr):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BN)
    ok = (row[:, None] < rows) & (cols[None, :] < n)
    x = tl.load(X + row[:, None] * sx + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    y = _rms_rows(x, W, cols, n, eps, X.dtype.element_ty)
    tl.store(Y + row[:, None] * sy + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)


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


@triton.jit
def _sigmoid(x):  # torch's: 1 / (1 + exp(-x)) in fp32
    return tl.math.div_rn(1.0, 1.0 + _exp(-x))


@triton.jit(do_not_specialize=["rows", "n"])
def _silu_mul_kernel(X, Y, rows, n, sx, sy, ROWS: tl.constexpr, BN: tl.constexpr):
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    ok = (row[:, None] < rows) & (cols[None, :] < n)
    at = X + row[:, None] * sx + cols[None, :]
    gate = tl.load(at, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(at + n, mask=ok, other=0.0).to(tl.float32)
    act = tl.math.div_rn(gate, 1.0 + _exp(-gate)).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row[:, None] * sy + cols[None, :], (act * up).to(Y.dtype.element_ty), mask=ok)


def silu_mul_triton(gate_up: torch.Tensor, rows: int | None = None, bn: int | None = None,
                    num_warps: int | None = None) -> torch.Tensor:
    """`rows`, `bn` (the tile) and the warps are for tuning."""
    n = gate_up.shape[-1] // 2
    x = gate_up.reshape(-1, 2 * n)
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    # a prompt chunk: 2 x 512 on 8 warps (4 values a thread): 2.16-2.30 ms against 2.79-2.85 for 4 x 1024 on 4
    # warps, 65536 x 16384 in bf16 on an H200 (bench/RESULTS.md); a decoded row: one program a 1024 columns
    many = x.shape[0] >= 64
    bn = bn or min(512 if many else 1024, triton.next_power_of_2(n))
    rows = rows or (2 if many else 1)
    _silu_mul_kernel[(triton.cdiv(x.shape[0], rows), triton.cdiv(n, bn))](
        x, y, x.shape[0], n, x.stride(0), y.stride(0), ROWS=rows, BN=bn, num_warps=num_warps or (8 if many else 4))
    return y.view(*gate_up.shape[:-1], n)


@triton.jit(do_not_specialize=["t"])
def _heads_gate_kernel(OUT, G, Y, t, soh, sot, sg, sy, BT: tl.constexpr, D: tl.constexpr):
    """Tokens of tile, head h: out[h, tok, :] (heads-first) times sigmoid(gate[tok, h*D : (h+1)*D]), to
    y[tok, h*D : (h+1)*D]; sigmoid rounded to the gate's dtype, then the product, as the two torch ops."""
    tile, h = tl.program_id(0), tl.program_id(1)
    rows = (tile * BT + tl.arange(0, BT)).to(tl.int64)
    cols = tl.arange(0, D)
    ok = rows[:, None] < t
    o = tl.load(OUT + h * soh + rows[:, None] * sot + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    g = tl.load(G + rows[:, None] * sg + h * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    gate = _sigmoid(g).to(G.dtype.element_ty).to(tl.float32)
    tl.store(Y + rows[:, None] * sy + h * D + cols[None, :], (o * gate).to(Y.dtype.element_ty), mask=ok)


def heads_gate_triton(out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    heads, t, d = out.shape
    if d & (d - 1) or out.stride(-1) != 1 or gate.stride(-1) != 1 or out.dtype != gate.dtype:
        return heads_gate_ref(out, gate)
    y = torch.empty(t, heads * d, dtype=gate.dtype, device=gate.device)
    bt = max(1, min(32, 4096 // d))
    _heads_gate_kernel[(triton.cdiv(t, bt), heads)](out, gate, y, t, out.stride(0), out.stride(1), gate.stride(0),
                                                    y.stride(0), BT=bt, D=d)
    return y


@triton.jit(do_not_specialize=["rows"])
def _add_rms_norm_kernel(H, Y, W, HOUT, XOUT, rows, n, scale, eps, sh, sy, sho, sxo, BN: tl.constexpr,
                         ROWS: tl.constexpr):
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BN)
    ok = (row[:, None] < rows) & (cols[None, :] < n)
    h = tl.load(H + row[:, None] * sh + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    y = tl.load(Y + row[:, None] * sy + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    step = (y * scale).to(H.dtype.element_ty).to(tl.float32)  # y * scale, then + h: two roundings, as two ops
    h = (h + step).to(H.dtype.element_ty)
    tl.store(HOUT + row[:, None] * sho + cols[None, :], h, mask=ok)
    x = _rms_rows(h.to(tl.float32), W, cols, n, eps, H.dtype.element_ty)
    tl.store(XOUT + row[:, None] * sxo + cols[None, :], x.to(XOUT.dtype.element_ty), mask=ok)


def add_rms_norm_triton(h: torch.Tensor, y: torch.Tensor, scale: float, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    n = h.shape[-1]
    h2, y2 = h.reshape(-1, n), y.reshape(-1, n)
    if n > 16384 or h2.stride(-1) != 1 or y2.stride(-1) != 1 or h.dtype != y.dtype:
        return add_rms_norm_ref(h, y, scale, weight, eps)
    h_out = torch.empty(h2.shape, dtype=h.dtype, device=h.device)
    x_out = torch.empty(h2.shape, dtype=torch.promote_types(h.dtype, weight.dtype), device=h.device)
    bn = triton.next_power_of_2(n)
    per = max(1, min(16, 4096 // bn))
    _add_rms_norm_kernel[(triton.cdiv(h2.shape[0], per),)](
        h2, y2, weight, h_out, x_out, h2.shape[0], n, float(scale), float(eps), h2.stride(0), y2.stride(0),
        h_out.stride(0), x_out.stride(0), BN=bn, ROWS=per)
    return h_out.view(h.shape), x_out.view(h.shape)


@triton.jit(do_not_specialize=["t"])
def _gated_rms_norm_kernel(OUT, W, G, Y, t, eps, soh, sot, sg, sy, HEADS: tl.constexpr, D: tl.constexpr):
    """Row `tok`: out[:, tok, :] (fp32, heads-first) as one row of HEADS * D in the gate's dtype, normed,
    scaled, times sigmoid(gate[tok])."""
    tok = tl.program_id(0).to(tl.int64)
    head = tl.arange(0, HEADS)
    d = tl.arange(0, D)
    cols = head[:, None] * D + d[None, :]
    x = tl.load(OUT + head[:, None] * soh + tok * sot + d[None, :]).to(G.dtype.element_ty).to(tl.float32)
    normed = x * tl.rsqrt(tl.sum(tl.sum(x * x, 1), 0) / (HEADS * D) + eps)
    normed = normed.to(G.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols).to(tl.float32)
    scaled = (normed * w).to(Y.dtype.element_ty).to(tl.float32)
    g = tl.load(G + tok * sg + cols).to(tl.float32)
    gate = _sigmoid(g).to(G.dtype.element_ty).to(tl.float32)
    tl.store(Y + tok * sy + cols, (scaled * gate).to(Y.dtype.element_ty))


def gated_rms_norm_triton(out: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor) -> torch.Tensor:
    heads, t, d = out.shape
    pow2 = heads & (heads - 1) == 0 and d & (d - 1) == 0
    if not pow2 or heads * d > 16384 or out.stride(-1) != 1 or gate.stride(-1) != 1 or weight.dtype != gate.dtype:
        return gated_rms_norm_ref(out, weight, eps, gate)
    y = torch.empty(t, heads * d, dtype=gate.dtype, device=gate.device)
    _gated_rms_norm_kernel[(t,)](out, weight, gate, y, t, float(eps), out.stride(0), out.stride(1), gate.stride(0),
                                 y.stride(0), HEADS=heads, D=d, num_warps=8 if heads * d >= 4096 else 4)
    return y


@triton.jit(do_not_specialize=["t"])
def _norm_rope_kernel(X, W, COS, SIN, Y, t, eps, sxt, sxh, BT: tl.constexpr, D: tl.constexpr):
    """Head h, tokens of tile: RMSNorm of each D-row (rounded as the norm rounds), then RoPE; the rotated
    partner of a column is normed from its own load (a row's sum of squares is the same)."""
    h, tile = tl.program_id(0), tl.program_id(1)
    rows = (tile * BT + tl.arange(0, BT)).to(tl.int64)
    cols = tl.arange(0, D)
    half = D // 2
    partner = tl.where(cols < half, cols + half, cols - half)
    ok = rows[:, None] < t
    base = X + rows[:, None] * sxt + h * sxh
    x = tl.load(base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    xp = tl.load(base + partner[None, :], mask=ok, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
    w, wp = tl.load(W + cols).to(tl.float32), tl.load(W + partner).to(tl.float32)
    dt = Y.dtype.element_ty
    normed = ((x * r).to(dt).to(tl.float32) * w[None, :]).to(dt).to(tl.float32)
    other = ((xp * r).to(dt).to(tl.float32) * wp[None, :]).to(dt).to(tl.float32)
    rotated = tl.where(cols[None, :] < half, -other, other)
    cos = tl.load(COS + rows[:, None] * D + cols[None, :], mask=ok, other=0.0)
    sin = tl.load(SIN + rows[:, None] * D + cols[None, :], mask=ok, other=0.0)
    y = tl.fma(normed, cos, 0.0) + tl.fma(rotated, sin, 0.0)  # as the rope kernel: no fused multiply-add
    tl.store(Y + (h * t + rows[:, None]) * D + cols[None, :], y.to(dt), mask=ok)


def norm_rope_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                     sin: torch.Tensor) -> torch.Tensor:
    t, heads, d = x.shape
    if x.stride(-1) != 1 or d & (d - 1) or weight.dtype != x.dtype:
        return norm_rope_ref(x, weight, eps, cos, sin)
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    y = torch.empty(heads, t, d, dtype=x.dtype, device=x.device)
    bt = max(1, min(64, 4096 // d))
    _norm_rope_kernel[(heads, triton.cdiv(t, bt))](x, weight, cos, sin, y, t, float(eps), x.stride(0), x.stride(1),
                                                   BT=bt, D=d)
    return y
