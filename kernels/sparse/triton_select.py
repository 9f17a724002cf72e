"""InfLLM-V2 block selection in Triton: the reference's scores, computed block-tile by block-tile.

`reference.py` defines the selection. Here two kernels compute, for every (KV group, query, block), the
block's score exactly as the reference does (fp32, softmax over the compressed keys normalised by the
level-2 log-sum-exp, summed over the group's heads, max over the level-1 chunks overlapping the block,
forced blocks +inf, blocks past the query -inf), and pack it with the block id into one int64 sort key:
    key = monotone_int32(score) * 2^32 + (2^31 - 1 - block)
Keys are unique, so `torch.topk` on them is exactly the reference's stable sort (ties go to the lower block).
Only the [T, n_blocks] keys reach memory, never the [H, T, n1] scores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from salachat.kernels.sparse.params import SparseParams


# lengths and positions change every decode step: compile once, not once per divisibility class
@triton.jit(do_not_specialize=["T", "n1", "n2", "q_pos0"])
def _lse_kernel(
    Q, K1, K2, LSE, T, n1, n2, q_pos0, scale, sqh, sqt, sk1h, sk1t, sk2h, sk2t,
    GROUP: tl.constexpr, BQ: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
    KERNEL: tl.constexpr, STRIDE: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):
    """lse[h, t] over visible level-2 keys (level-1 keys while no level-2 key is visible yet). With SPLITS > 1
    program `split` covers every SPLITS-th tile of keys and LSE is [SPLITS, H, T] partials."""
    tile, g, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tl.arange(0, GROUP * BQ)
    head = g * GROUP + rows // BQ
    qi = tile * BQ + rows % BQ
    valid = qi < T
    pos = q_pos0 + qi
    offs_d = tl.arange(0, D)
    q = tl.load(Q + head[:, None] * sqh + qi[:, None] * sqt + offs_d[None, :], mask=valid[:, None], other=0.0)
    m = tl.full((GROUP * BQ,), float("-inf"), tl.float32)
    s_sum = tl.zeros((GROUP * BQ,), tl.float32)
    for start in range(split * BN, n2, SPLITS * BN):
        cols = start + tl.arange(0, BN)
        k = tl.load(K2 + g * sk2h + cols[:, None] * sk2t + offs_d[None, :], mask=cols[:, None] < n2, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = (cols[None, :] * (4 * STRIDE) + 4 * KERNEL <= pos[:, None] + 1) & (cols[None, :] < n2)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_sum = s_sum * tl.exp(m - safe) + tl.sum(tl.exp(s - safe[:, None]), 1)
        m = m_new
    lse = m + tl.log(s_sum)
    # before the first level-2 key is complete (p < 4 kernel - 1), the level-1 keys normalise themselves
    if q_pos0 + tile * BQ < 4 * KERNEL - 1:
        m1 = tl.full((GROUP * BQ,), float("-inf"), tl.float32)
        s1_sum = tl.zeros((GROUP * BQ,), tl.float32)
        for start in range(split * BN, n1, SPLITS * BN):
            cols = start + tl.arange(0, BN)
            k = tl.load(K1 + g * sk1h + cols[:, None] * sk1t + offs_d[None, :], mask=cols[:, None] < n1, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            visible = (cols[None, :] * STRIDE + KERNEL <= pos[:, None] + 1) & (cols[None, :] < n1)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m1, tl.max(s, 1))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s1_sum = s1_sum * tl.exp(m1 - safe) + tl.sum(tl.exp(s - safe[:, None]), 1)
            m1 = m_new
        lse = tl.where(pos + 1 >= 4 * KERNEL, lse, m1 + tl.log(s1_sum))
    tl.store(LSE + (split * tl.num_programs(1) * GROUP + head) * T + qi, lse, mask=valid)


@triton.jit(do_not_specialize=["T", "n1", "n_blocks", "q_pos0"])
def _score_kernel(
    Q, K1, LSE, KEYS, T, n1, n_blocks, q_pos0, scale, sqh, sqt, sk1h, sk1t, skeyh, skeyt,
    GROUP: tl.constexpr, BQ: tl.constexpr, D: tl.constexpr, NB: tl.constexpr,
    BLOCK: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr, WIDTH: tl.constexpr,
    INIT: tl.constexpr, LOCAL: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):
    btile, tile, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tl.arange(0, GROUP * BQ)
    head = g * GROUP + rows // BQ
    qi = tile * BQ + rows % BQ
    valid = qi < T
    pos = q_pos0 + qi
    offs_d = tl.arange(0, D)
    q = tl.load(Q + head[:, None] * sqh + qi[:, None] * sqt + offs_d[None, :], mask=valid[:, None], other=0.0)
    if SPLITS == 1:
        lse = tl.load(LSE + head * T + qi, mask=valid, other=0.0)
    else:  # merge the LSE kernel's partials here rather than in a chain of small torch kernels
        heads = tl.num_programs(2) * GROUP
        split = tl.arange(0, SPLITS)
        part = tl.load(LSE + (split[:, None] * heads + head[None, :]) * T + qi[None, :], mask=valid[None, :],
                       other=float("-inf"))
        top = tl.max(part, 0)
        safe = tl.where(top == float("-inf"), 0.0, top)
        lse = safe + tl.log(tl.sum(tl.exp(part - safe[None, :]), 0))
        lse = tl.where(valid, lse, 0.0)
    blocks = btile * NB + tl.arange(0, NB)
    lo = tl.maximum((blocks * BLOCK - KERNEL) // STRIDE + 1, 0)  # first level-1 chunk overlapping the block
    lo = tl.where(blocks * BLOCK - KERNEL < 0, 0, lo)  # floor division of a negative rounds toward zero here
    hi = ((blocks + 1) * BLOCK - 1) // STRIDE
    pooled = tl.full((BQ, NB), float("-inf"), tl.float32)
    for w in range(WIDTH):
        chunk = lo + w
        exists = (chunk <= hi) & (chunk < n1)
        k = tl.load(K1 + g * sk1h + chunk[:, None] * sk1t + offs_d[None, :], mask=exists[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = (chunk[None, :] * STRIDE + KERNEL <= pos[:, None] + 1) & exists[None, :]
        prob = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
        score = tl.sum(tl.reshape(prob, (GROUP, BQ, NB)), 0)  # summed over the group's heads
        pooled = tl.where(exists[None, :], tl.maximum(pooled, score), pooled)
    q_rows = tile * BQ + tl.arange(0, BQ)
    qb = (q_pos0 + q_rows) // BLOCK
    forced = (blocks[None, :] < INIT) | ((blocks[None, :] >= qb[:, None] - LOCAL) & (blocks[None, :] <= qb[:, None]))
    pooled = tl.where(forced, float("inf"), pooled)
    pooled = tl.where(blocks[None, :] <= qb[:, None], pooled, float("-inf"))
    bits = pooled.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # order of the floats as signed integers
    key = bits.to(tl.int64) * 4294967296 + (2147483647 - blocks[None, :]).to(tl.int64)
    ok = (q_rows[:, None] < T) & (blocks[None, :] < n_blocks)
    tl.store(KEYS + g * skeyh + q_rows[:, None] * skeyt + blocks[None, :], key, mask=ok)


TOPK_TILE = 1024


def _top_blocks(keys: torch.Tensor, k: int, tile: int) -> torch.Tensor:
    """Block ids of the k largest keys of each row, ascending. The block id is in the key's low 32 bits."""
    if tile:  # blocks past the row's end were written as -inf scores: never above a real block
        keys = keys.unflatten(-1, (-1, tile)).topk(k, dim=-1, sorted=False).values.flatten(-2)
    best = keys.topk(k, dim=-1, sorted=False).values
    return (2147483647 - (best & 0xFFFFFFFF)).sort(-1).values


def _tile_queries(group: int) -> int:
    return max(1, 64 // group) if group <= 64 else 1


def select_blocks_triton(q, k1, k2, q_pos0: int, params: SparseParams, scale: float, query_tile: int = 4096,
                         topk_tile: int = TOPK_TILE):
    """Same contract as select_blocks_ref: idx [Hkv, T, topk + local] (ascending ids, then -1)."""
    heads, t, d = q.shape
    kv_heads, n1, n2 = k1.shape[0], k1.shape[1], k2.shape[1]
    group = heads // kv_heads
    p = params
    q = q if q.stride(-1) == 1 else q.contiguous()
    k1 = k1 if k1.stride(-1) == 1 else k1.contiguous()
    k2 = k2 if k2.stride(-1) == 1 else k2.contiguous()
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    bq = _tile_queries(group)
    chunks = (p.block_size + p.kernel_size - 2) // p.kernel_stride + 1  # level-1 chunks overlapping a block
    out = None
    for begin in range(0, t, query_tile):  # bounds the [Hkv, tile, n_blocks] keys at a long context
        qs = q[:, begin : begin + query_tile]
        n, pos0 = qs.shape[1], q_pos0 + begin
        n_blocks = (pos0 + n - 1) // p.block_size + 1
        tiles = triton.cdiv(n, bq)
        splits = 1 if tiles * kv_heads >= 64 else 32  # decode: spread the keys over programs
        lse = torch.empty(splits, heads, n, dtype=torch.float32, device=q.device)  # merged by the score kernel
        _lse_kernel[(tiles, kv_heads, splits)](
            qs, k1, k2, lse, n, n1, n2, pos0, float(scale), qs.stride(0), qs.stride(1),
            k1.stride(0), k1.stride(1), k2.stride(0), k2.stride(1),
            GROUP=group, BQ=bq, D=d, BN=64, KERNEL=p.kernel_size, STRIDE=p.kernel_stride, SPLITS=splits,
            PRECISION=precision,
        )
        # a long row's top-k goes in two rounds (the best of each tile of blocks, then the best of those):
        # the same set, as keys are unique, and far more parallel than one radix select over 16K blocks
        nb = 64
        tiled = n_blocks > 2 * topk_tile and p.selected <= topk_tile
        width = triton.cdiv(n_blocks, topk_tile) * topk_tile if tiled else n_blocks
        keys = torch.empty(kv_heads, n, width, dtype=torch.int64, device=q.device)
        _score_kernel[(triton.cdiv(width, nb), triton.cdiv(n, bq), kv_heads)](
            qs, k1, lse, keys, n, n1, width, pos0, float(scale), qs.stride(0), qs.stride(1),
            k1.stride(0), k1.stride(1), keys.stride(0), keys.stride(1),
            GROUP=group, BQ=bq, D=d, NB=nb, BLOCK=p.block_size, KERNEL=p.kernel_size, STRIDE=p.kernel_stride,
            WIDTH=chunks, INIT=p.init_blocks, LOCAL=p.local_blocks, SPLITS=splits, PRECISION=precision,
        )
        chosen = _top_blocks(keys, min(p.selected, n_blocks), topk_tile if tiled else 0)
        if t == 1 and pos0 // p.block_size + 1 >= p.selected:  # decode past the first blocks: every slot real
            return chosen.to(torch.int32)
        if out is None:
            out = torch.full((kv_heads, t, p.selected), -1, dtype=torch.int32, device=q.device)
        qb = torch.div(torch.arange(pos0, pos0 + n, device=q.device), p.block_size, rounding_mode="floor")
        count = torch.clamp(qb + 1, max=p.selected)
        keep = torch.arange(chosen.shape[-1], device=q.device)[None, :] < count[:, None]
        out[:, begin : begin + n, : chosen.shape[-1]] = torch.where(keep[None], chosen, -1).to(torch.int32)
    return out
