"""Extended attention (see reference.py) as one Triton kernel: a program per (query tile, query head).

A tile is up to BQ rows of one query group. It reads the group's memory blocks (unrotated keys, the query
rotated by the memory distance), then its local span with each key tile rotated in registers by (j - ls)
from the rotary table, all under one online softmax. A program serves one query head, so any GQA group
size works (no power-of-two arange over heads) and K/V stay unrepeated in memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["pos0", "n_mem"])
def _extended_kernel(QL, QM, K, V, O, MEM, TILE_ROW0, TILE_ROWS, TILE_GROUP, GROUP_START, COS, SIN,
                     pos0, n_mem, scale, sqh, sqt, skh, skt, smh, smg,
                     PER: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, BQ: tl.constexpr,
                     BK: tl.constexpr, BM: tl.constexpr):
    tile, h = tl.program_id(0), tl.program_id(1)
    kvh = h // PER
    row0 = tl.load(TILE_ROW0 + tile)
    n_rows = tl.load(TILE_ROWS + tile)
    group = tl.load(TILE_GROUP + tile)
    ls = tl.load(GROUP_START + group)
    rows = row0 + tl.arange(0, BQ)
    row_ok = tl.arange(0, BQ) < n_rows
    cols = tl.arange(0, D)
    half = D // 2
    partner = tl.where(cols < half, cols + half, cols - half)
    sign = tl.where(cols < half, -1.0, 1.0)
    q_off = h * sqh + rows[:, None] * sqt + cols[None, :]
    qm = tl.load(QM + q_off, mask=row_ok[:, None], other=0.0)
    ql = tl.load(QL + q_off, mask=row_ok[:, None], other=0.0)
    # a finite floor instead of -inf keeps exp(m_old - m_new) defined while a row has seen no key
    m_i = tl.full([BQ], -1.0e30, tl.float32)
    l_i = tl.zeros([BQ], tl.float32)
    acc = tl.zeros([BQ, D], tl.float32)
    k_base = K + kvh * skh
    v_base = V + kvh * skh
    for i in range(n_mem):
        b = tl.load(MEM + kvh * smh + group * smg + i)
        if b >= 0:
            for j in range(0, BLOCK, BM):
                keys = b * BLOCK + j + tl.arange(0, BM)
                k = tl.load(k_base + keys[:, None] * skt + cols[None, :])
                v = tl.load(v_base + keys[:, None] * skt + cols[None, :])
                s = tl.dot(qm, tl.trans(k)) * scale
                m_new = tl.maximum(m_i, tl.max(s, 1))
                p = tl.exp(s - m_new[:, None])
                alpha = tl.exp(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
    end = pos0 + row0 + n_rows  # one past the tile's last query position
    for start in range(ls, end, BK):
        keys = start + tl.arange(0, BK)
        key_ok = keys < end
        k = tl.load(k_base + keys[:, None] * skt + cols[None, :], mask=key_ok[:, None], other=0.0).to(tl.float32)
        kp = tl.load(k_base + keys[:, None] * skt + partner[None, :], mask=key_ok[:, None], other=0.0)
        rel = keys - ls
        cos = tl.load(COS + rel[:, None] * D + cols[None, :], mask=key_ok[:, None], other=0.0)
        sin = tl.load(SIN + rel[:, None] * D + cols[None, :], mask=key_ok[:, None], other=0.0)
        # the reference's rounding: two fp32 products added, then the activation dtype
        k_rot = (tl.fma(k, cos, 0.0) + tl.fma(kp.to(tl.float32) * sign[None, :], sin, 0.0)).to(kp.dtype)
        v = tl.load(v_base + keys[:, None] * skt + cols[None, :], mask=key_ok[:, None], other=0.0)
        s = tl.dot(ql, tl.trans(k_rot)) * scale
        visible = keys[None, :] <= (pos0 + rows)[:, None]
        s = tl.where(visible, s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        p = tl.where(visible, p, 0.0)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(O + q_off, out.to(O.dtype.element_ty), mask=row_ok[:, None])


def extended_attention_triton(q_loc, q_mem, keys, values, memory, row_group, group_start, pos0: int,
                              cos, sin, block: int, scale: float) -> torch.Tensor:
    heads, t, d = q_loc.shape
    hkv = keys.shape[0]
    if keys.stride(-1) != 1 or values.stride() != keys.stride():
        keys, values = keys.contiguous(), values.contiguous()
    q_loc, q_mem = q_loc.contiguous(), q_mem.contiguous()
    memory = memory.contiguous()
    bq = 64 if t >= 64 else 16
    bk = 64 if d <= 64 else 32  # d128: the rotated tile and its partner fit shared memory
    # tiles: up to bq rows of one group each (rows of a group are consecutive)
    counts = torch.bincount(row_group, minlength=memory.shape[1]).tolist()
    row0, n_rows, tile_group, r = [], [], [], 0
    for g, c in enumerate(counts):
        for off in range(0, c, bq):
            row0.append(r + off)
            n_rows.append(min(bq, c - off))
            tile_group.append(g)
        r += c
    dev = keys.device
    meta = torch.tensor([row0, n_rows, tile_group], dtype=torch.int32).to(dev, non_blocking=True)
    out = torch.empty_like(q_loc)
    # the reference rotates in fp32 and rounds to the key dtype; so does the kernel
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    grid = (len(row0), heads)
    _extended_kernel[grid](q_loc, q_mem, keys, values, out, memory, meta[0], meta[1], meta[2],
                           group_start.to(torch.int32).contiguous(), cos, sin, pos0, memory.shape[2], scale,
                           q_loc.stride(0), q_loc.stride(1), keys.stride(0), keys.stride(1),
                           memory.stride(0), memory.stride(1),
                           PER=heads // hkv, D=d, BLOCK=block, BQ=bq, BK=bk, BM=min(bk, block),
                           num_stages=2, num_warps=4)
    return out
