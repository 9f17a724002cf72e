"""Lightning attention in Triton: one kernel for prefill (chunked) and decode (a chunk of one token).

Same maths and layout as `reference.py` (read it first). One program owns one head and a BV-wide slice of
the value dimension, keeps that slice of the state [D, BV] in fp32 registers and walks the sequence a
chunk of C tokens at a time:
    o     = s * (exp(g(i+1)) q) @ S  +  s * ((q k^T) ⊙ decay) @ v        (decay[i, j] = exp(g(i-j)), i >= j)
    S_new = exp(g n) S + (exp(g(n-1-j)) k)^T @ v
so the state never leaves the chip and nothing of size [T, D, D] is written (at a 1M context, fla-style
per-chunk states would take gigabytes). The three matmuls per chunk run on tensor cores in the input dtype
with fp32 accumulation; the state stays fp32 and is rounded to the input dtype only where q reads it, the
same trade fla's kernels make. fp32 inputs (tests, the interpreter) keep every product in IEEE fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# the length changes every call: one compiled kernel for all lengths, not one per divisibility class
@triton.jit(do_not_specialize=["T"])
def _lightning_kernel(
    Q, K, V, G, S_in, O, S_out, T, scale,
    sqh, sqt, skh, skt, svh, svt, soh, sot,
    GROUP: tl.constexpr, D: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    HAS_STATE: tl.constexpr, PRECISION: tl.constexpr,
):
    iv, h = tl.program_id(0), tl.program_id(1)
    hk = h // GROUP
    g = tl.load(G + h).to(tl.float32)
    offs_c = tl.arange(0, C)
    offs_d = tl.arange(0, D)
    offs_v = iv * BV + tl.arange(0, BV)
    state_ptrs = h * D * D + offs_d[:, None] * D + offs_v[None, :]
    if HAS_STATE:
        state = tl.load(S_in + state_ptrs)
    else:
        state = tl.zeros((D, BV), dtype=tl.float32)
    pos = offs_c.to(tl.float32)
    diff = pos[:, None] - pos[None, :]
    causal = diff >= 0
    # exp of a masked exponent: exp(g * negative diff) would overflow for strong decays
    intra_decay = tl.where(causal, tl.exp(g * tl.where(causal, diff, 0.0)), 0.0)
    q_decay = tl.exp(g * (pos + 1.0))
    dtype = Q.dtype.element_ty
    for start in range(0, T, C):
        rows = start + offs_c
        valid = rows < T
        n = tl.minimum(T - start, C)
        q = tl.load(Q + h * sqh + rows[:, None] * sqt + offs_d[None, :], mask=valid[:, None], other=0.0)
        k = tl.load(K + hk * skh + rows[:, None] * skt + offs_d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(V + hk * svh + rows[:, None] * svt + offs_v[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * intra_decay
        out = tl.dot(scores.to(dtype), v, input_precision=PRECISION)
        out += tl.dot((q * q_decay[:, None]).to(dtype), state.to(dtype), input_precision=PRECISION)
        tl.store(O + h * soh + rows[:, None] * sot + offs_v[None, :], (out * scale).to(O.dtype.element_ty),
                 mask=valid[:, None])
        k_decay = tl.where(valid, tl.exp(g * tl.where(valid, n - 1.0 - pos, 0.0)), 0.0)
        state = state * tl.exp(g * n) + tl.dot(tl.trans((k * k_decay[:, None]).to(dtype)), v,
                                               input_precision=PRECISION)
    tl.store(S_out + state_ptrs, state)


def lightning_attention_triton(q, k, v, log_decay, scale: float, state=None, chunk: int | None = None,
                               block_v: int | None = None, num_warps: int | None = None, num_stages: int = 3,
                               update_state: bool = False):
    """q [H, T, D], k/v [Hkv, T, D] (last dim contiguous), log_decay [H], state [H, D, D] fp32 or None.

    Returns (o, state): o [H, T, D] in q's dtype (fp32 for fp32 inputs), state fp32. With `update_state` the
    new state is written over `state` (a contiguous fp32 one) and returned: each program reads its slice of
    the state before it writes it, and no other program touches that slice. The tuning knobs are for
    bench/lightning_bench.py; the defaults were measured on an H100 (see bench/RESULTS.md).
    """
    heads, t, d = q.shape
    kv_heads = k.shape[0]
    assert d & (d - 1) == 0 and heads % kv_heads == 0, "head dim must be a power of two, heads a multiple of kv heads"
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if chunk is None:
        chunk = 16 if t <= 16 else 64
    block_v = block_v or min(d, 32)
    out = torch.empty(heads, t, d, dtype=q.dtype, device=q.device)
    in_place = update_state and state is not None and state.dtype == torch.float32 and state.is_contiguous()
    new_state = state if in_place else torch.empty(heads, d, d, dtype=torch.float32, device=q.device)
    s_in = state.float().contiguous() if state is not None else new_state
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (d // block_v, heads)
    _lightning_kernel[grid](
        q, k, v, log_decay.float().contiguous(), s_in, out, new_state, t, float(scale),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        GROUP=heads // kv_heads, D=d, BV=block_v, C=chunk, HAS_STATE=state is not None, PRECISION=precision,
        num_warps=num_warps or 4, num_stages=num_stages,
    )
    return out, new_state
