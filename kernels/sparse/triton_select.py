"""InfLLM-V2 block selection in Triton: the reference's block scores, fused, and an exact top-k.

`reference.py` defines the selection. For every (KV group, query, block) the kernels compute the block's score
as the reference does (fp32 softmax of the level-1 scores normalised by the level-2 log-sum-exp, summed over
the group's heads, max over the level-1 chunks overlapping the block, forced blocks +inf, blocks past the query
-inf) and pack it with the block id into one int64 sort key:
    key = monotone_int32(score) * 2^32 + (2^31 - 1 - block)
Keys are unique, so their k largest are exactly the reference's stable sort (ties go to the lower block): on
the GPU `triton_topk.py` finds them, elsewhere (and as its reference) `_top_blocks` with `torch.topk`. Only the
[T, n_blocks] keys reach memory, never the [H, T, n1] scores.

Two scorers. `_flash_score_kernel` (every geometry where a block owns a power of two of level-1 chunks and
overlaps at most one chunk of the block before it: MiniCPM-SALA's 64/32/16 and the Llama defaults) is written
like flash attention: a tile of queries (all the group's heads side by side) walks contiguous tiles of
level-1 keys on tensor cores (keys as the rows of the product), each score is computed once, exp2 of the
normalised score, the head sum and the max-pool are done in registers (a chunk shared with the previous block
is carried across tiles). The older `_tile_score_kernel` gathers the overlapping chunks of each block (5/4 of
the work) and serves the other geometries. The group of query heads is padded to a power of two (tl.arange
needs one) and the padded heads are masked, so any GQA group size works.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl
from salachat.kernels.sparse.params import SparseParams
from salachat.kernels.sparse.triton_topk import TOPK_ROW, fits, top_blocks_triton

LOG2E = 1.4426950408889634


@triton.jit
def _rows(tile, g, T, q_pos0, GROUP: tl.constexpr, GPAD: tl.constexpr, BQ: tl.constexpr):
    """Row r of a program's tile is query r // GPAD, head r % GPAD of group g (heads past GROUP are padding)."""
    rows = tl.arange(0, BQ * GPAD)
    hrow = rows % GPAD
    head = g * GROUP + tl.minimum(hrow, GROUP - 1)
    qi = tile * BQ + rows // GPAD
    valid = (qi < T) & (hrow < GROUP)
    return head, qi, valid, q_pos0 + qi


@triton.jit
def _merged_lse(LSE, head, qi, valid, T, heads, SPLITS: tl.constexpr):
    """The LSE kernel's output for these rows (its SPLITS partials merged); +inf on padded rows, whose
    exp(s - lse) is then 0 in every sum."""
    if SPLITS == 1:
        lse = tl.load(LSE + head * T + qi, mask=valid, other=0.0)
    else:  # merge the partials here rather than in a chain of small torch kernels
        split = tl.arange(0, SPLITS)
        part = tl.load(LSE + (split[:, None] * heads + head[None, :]) * T + qi[None, :], mask=valid[None, :],
                       other=float("-inf"))
        top = tl.max(part, 0)
        safe = tl.where(top == float("-inf"), 0.0, top)
        lse = safe + tl.log(tl.sum(tl.exp(part - safe[None, :]), 0))
    return tl.where(valid, lse, float("inf"))


@triton.jit
def _pack_keys(pooled, blocks, qb, INIT: tl.constexpr, LOCAL: tl.constexpr):
    """Forced blocks +inf, blocks past the query -inf, then the int64 sort key (ties: lower block first)."""
    forced = (blocks[None, :] < INIT) | ((blocks[None, :] >= qb[:, None] - LOCAL) & (blocks[None, :] <= qb[:, None]))
    pooled = tl.where(forced, float("inf"), pooled)
    pooled = tl.where(blocks[None, :] <= qb[:, None], pooled, float("-inf"))
    bits = pooled.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # order of the floats as signed integers
    return bits.to(tl.int64) * 4294967296 + (2147483647 - blocks[None, :]).to(tl.int64)


# lengths and positions change every decode step: compile once, not once per divisibility class
@triton.jit(do_not_specialize=["T", "n1", "n2", "q_pos0"])
def _lse_kernel(
    Q, K1, K2, LSE, T, n1, n2, q_pos0, scale, sqh, sqt, sk1h, sk1t, sk2h, sk2t,
    GROUP: tl.constexpr, GPAD: tl.constexpr, BQ: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
    KERNEL: tl.constexpr, STRIDE: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):
    """lse[h, t] over visible level-2 keys (level-1 keys while no level-2 key is visible yet). With SPLITS > 1
    program `split` covers every SPLITS-th tile of keys and LSE is [SPLITS, H, T] partials."""
    tile, g, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    head, qi, valid, pos = _rows(tile, g, T, q_pos0, GROUP, GPAD, BQ)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + head[:, None] * sqh + qi[:, None] * sqt + offs_d[None, :], mask=valid[:, None], other=0.0)
    c = scale * 1.4426950408889634  # exp2 domain
    m = tl.full((BQ * GPAD,), float("-inf"), tl.float32)
    s_sum = tl.zeros((BQ * GPAD,), tl.float32)
    # tiles of keys the tile's first query sees whole (all but the last at a long context) need no mask; the
    # online sums run over the tiles in the same order either way, so the bits are the same
    first_pos = q_pos0 + tile * BQ
    n2_full = tl.where(first_pos + 1 >= 4 * KERNEL, tl.minimum((first_pos + 1 - 4 * KERNEL) // (4 * STRIDE) + 1, n2), 0)
    room = n2_full - BN - split * BN
    edge_start = split * BN + tl.where(room >= 0, room // (SPLITS * BN) + 1, 0) * (SPLITS * BN)
    for start in range(split * BN, edge_start, SPLITS * BN):
        cols = start + tl.arange(0, BN)
        k = tl.load(K2 + g * sk2h + cols[:, None] * sk2t + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * c
        m_new = tl.maximum(m, tl.max(s, 1))
        s_sum = s_sum * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m = m_new
    for start in range(edge_start, n2, SPLITS * BN):
        cols = start + tl.arange(0, BN)
        k = tl.load(K2 + g * sk2h + cols[:, None] * sk2t + offs_d[None, :], mask=cols[:, None] < n2, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * c
        visible = (cols[None, :] * (4 * STRIDE) + 4 * KERNEL <= pos[:, None] + 1) & (cols[None, :] < n2)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_sum = s_sum * tl.exp2(m - safe) + tl.sum(tl.exp2(s - safe[:, None]), 1)
        m = m_new
    lse = (m + tl.log2(s_sum)) / 1.4426950408889634
    # before the first level-2 key is complete (p < 4 kernel - 1), the level-1 keys normalise themselves
    if q_pos0 + tile * BQ < 4 * KERNEL - 1:
        m1 = tl.full((BQ * GPAD,), float("-inf"), tl.float32)
        s1_sum = tl.zeros((BQ * GPAD,), tl.float32)
        for start in range(split * BN, n1, SPLITS * BN):
            cols = start + tl.arange(0, BN)
            k = tl.load(K1 + g * sk1h + cols[:, None] * sk1t + offs_d[None, :], mask=cols[:, None] < n1, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * c
            visible = (cols[None, :] * STRIDE + KERNEL <= pos[:, None] + 1) & (cols[None, :] < n1)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m1, tl.max(s, 1))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s1_sum = s1_sum * tl.exp2(m1 - safe) + tl.sum(tl.exp2(s - safe[:, None]), 1)
            m1 = m_new
        lse = tl.where(pos + 1 >= 4 * KERNEL, lse, (m1 + tl.log2(s1_sum)) / 1.4426950408889634)
    tl.store(LSE + (split * tl.num_programs(1) * GROUP + head) * T + qi, lse, mask=valid)


@triton.jit
def _cols(tile, g, T, q_pos0, GROUP: tl.constexpr, GPAD: tl.constexpr, BQ: tl.constexpr):
    """The flash scorer's tile is transposed (keys as rows, the program's (query, head) pairs as columns), and
    column c holds head (c // 2BQ) * 2 + c % 2 of query (c // 2) % BQ: in the wgmma accumulator a thread holds
    columns c % 8 in {2l, 2l + 1} of every 8, so with this order all 16 heads of a query sit in one thread's
    registers (4 queries in the 4 lanes l) and the sum over the heads needs no shuffle."""
    c = tl.arange(0, BQ * GPAD)
    if GPAD == 1:
        hrow = c * 0
        qloc = c
    else:
        hrow = (c // (2 * BQ)) * 2 + c % 2
        qloc = (c // 2) % BQ
    head = g * GROUP + tl.minimum(hrow, GROUP - 1)
    qi = tile * BQ + qloc
    valid = (qi < T) & (hrow < GROUP)
    return head, qi, valid, q_pos0 + qi


@triton.jit
def _head_sum(p, BN: tl.constexpr, BQ: tl.constexpr, GPAD: tl.constexpr):
    """[BN, BQ * GPAD] in `_cols`' order -> [BN, BQ], summed over the heads highest head bit first, the tree
    the row-major scorer's butterfly reduction used (so the sums are the same bits)."""
    if GPAD == 1:
        score = p
    else:
        x = tl.reshape(p, (BN, GPAD // 2, 2 * BQ))
        for i in tl.static_range(GPAD.bit_length() - 2):
            x = tl.sum(tl.reshape(x, (BN, 2, GPAD // (4 << i), 2 * BQ)), 1)
        score = tl.sum(tl.reshape(x, (BN, BQ, 2)), 2)
    return score


@triton.jit
def _chunk_dot(qt, K1g, cols, n1, sk1t, D: tl.constexpr, PRECISION: tl.constexpr, EDGE: tl.constexpr):
    """[BN, BQ * GPAD]: level-1 keys `cols` (past n1 or below 0 as zeros where EDGE) times the queries."""
    offs_d = tl.arange(0, D)
    if EDGE:
        k = tl.load(K1g + cols[:, None] * sk1t + offs_d[None, :], mask=(cols[:, None] < n1) & (cols[:, None] >= 0),
                    other=0.0)
    else:
        k = tl.load(K1g + cols[:, None] * sk1t + offs_d[None, :])
    return tl.dot(k, qt, input_precision=PRECISION)


@triton.jit
def _head_scores(s, cols, n1, lse2, pos, c, BQ: tl.constexpr, GPAD: tl.constexpr, BN: tl.constexpr,
                 KERNEL: tl.constexpr, STRIDE: tl.constexpr, EDGE: tl.constexpr):
    """[BN, BQ]: sum over the group's heads of exp(s1 - lse) for the dot `s` of level-1 chunks `cols` (0 where
    a query does not see the chunk, -inf where the chunk does not exist). EDGE=False: every chunk exists and
    every query sees it (the interior of a long context), so no mask is computed; the values are the same
    bits."""
    p = tl.exp2(s * c - lse2[None, :])
    if EDGE:
        p = tl.where(cols[:, None] * STRIDE + KERNEL <= pos[None, :] + 1, p, 0.0)
    score = _head_sum(p, BN, BQ, GPAD)
    if EDGE:
        score = tl.where((cols[:, None] < n1) & (cols[:, None] >= 0), score, float("-inf"))
    return score


@triton.jit
def _group_scores(qt, K1g, cols, n1, sk1t, lse2, pos, c, BQ: tl.constexpr, GPAD: tl.constexpr,
                  BN: tl.constexpr, D: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr,
                  PRECISION: tl.constexpr, EDGE: tl.constexpr = True):
    """`_head_scores` of `_chunk_dot`: qt is the program's queries [D, BQ * GPAD] in `_cols`' order."""
    s = _chunk_dot(qt, K1g, cols, n1, sk1t, D, PRECISION, EDGE)
    return _head_scores(s, cols, n1, lse2, pos, c, BQ, GPAD, BN, KERNEL, STRIDE, EDGE)


@triton.jit
def _pool_and_store(score, carry, b0, qb, q_rows, T, b_end, KEYSg, skeyt, BQ: tl.constexpr, NB: tl.constexpr,
                    PER_BLOCK: tl.constexpr, LOOKBACK: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr):
    """Max-pool a tile's chunk scores [NB * PER_BLOCK, BQ] into its NB blocks (with LOOKBACK the last chunk of
    the block before, `carry` across tiles), store the blocks' keys; returns the carry for the next tile."""
    nb = tl.arange(0, NB)
    e = tl.arange(0, PER_BLOCK)
    grouped = tl.reshape(score, (NB, PER_BLOCK, BQ))
    pooled = tl.max(grouped, 1)
    if LOOKBACK:
        last = tl.max(tl.where(e[None, :, None] == PER_BLOCK - 1, grouped, float("-inf")), 1)  # [NB, BQ]
        prev = tl.gather(last, tl.maximum(nb - 1, 0)[:, None] + tl.zeros((NB, BQ), tl.int32), 0)
        prev = tl.where(nb[:, None] == 0, carry[None, :], prev)
        pooled = tl.maximum(pooled, prev)
        carry = tl.max(tl.where(nb[:, None] == NB - 1, last, float("-inf")), 0)
    blocks = b0 + nb
    key = _pack_keys(tl.trans(pooled), blocks, qb, INIT, LOCAL)
    ok = (q_rows[:, None] < T) & (blocks[None, :] < b_end)
    tl.store(KEYSg + q_rows[:, None] * skeyt + blocks[None, :], key, mask=ok)
    return carry


# lengths and positions change every decode step: compile once, not once per divisibility class
@triton.jit(do_not_specialize=["T", "n1", "n_blocks", "q_pos0", "per_split"])
def _flash_score_kernel(
    Q, K1, LSE, KEYS, T, n1, n_blocks, q_pos0, scale, per_split, sqh, sqt, sk1h, sk1t, skeyh, skeyt,
    GROUP: tl.constexpr, GPAD: tl.constexpr, BQ: tl.constexpr, D: tl.constexpr, NB: tl.constexpr,
    PER_BLOCK: tl.constexpr, LOOKBACK: tl.constexpr, BLOCK: tl.constexpr, KERNEL: tl.constexpr,
    STRIDE: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr, SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Keys of blocks [split * per_split, +per_split) for BQ queries of group g. Block b owns level-1 chunks
    PER_BLOCK*b .. PER_BLOCK*b + PER_BLOCK - 1 and, with LOOKBACK, also overlaps chunk PER_BLOCK*b - 1 (the
    last of block b - 1): that chunk's group score is carried from the previous tile."""
    tile, g, bsplit = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    head, qi, valid, pos = _cols(tile, g, T, q_pos0, GROUP, GPAD, BQ)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + head[None, :] * sqh + qi[None, :] * sqt + offs_d[:, None], mask=valid[None, :], other=0.0)
    lse2 = _merged_lse(LSE, head, qi, valid, T, tl.num_programs(1) * GROUP, SPLITS) * 1.4426950408889634
    c = scale * 1.4426950408889634
    q_rows = tile * BQ + tl.arange(0, BQ)
    qb = (q_pos0 + q_rows) // BLOCK
    last_pos = q_pos0 + tl.minimum(tile * BQ + BQ, T) - 1
    # chunks visible to the tile's last query, and the blocks that touch one of them
    # (a negative numerator would divide toward zero here, not down)
    n_vis = tl.where(last_pos + 1 >= KERNEL, tl.minimum((last_pos + 1 - KERNEL) // STRIDE + 1, n1), 0)
    b_begin = bsplit * per_split
    b_end = tl.minimum(b_begin + per_split, n_blocks)
    b_comp = tl.where(n_vis > 0, (n_vis - 1 + LOOKBACK) // PER_BLOCK + 1, 0)
    b_comp = tl.minimum(tl.maximum(b_comp, b_begin), b_end)
    # tiles of blocks whose chunks all exist and are all seen by the tile's first query (so by every one) need
    # no mask: at a long context that is all but the last tile or two (the scorer 34.5 -> 31.9 ms for a
    # 16K-query chunk at 1M tokens, the settings unchanged). The tile grid is aligned to NB blocks in every
    # program, so "interior" is the same decision wherever a tile is computed.
    first_pos = q_pos0 + tile * BQ
    n_full = tl.where(first_pos + 1 >= KERNEL, tl.minimum((first_pos + 1 - KERNEL) // STRIDE + 1, n1), 0)
    full_blocks = n_full // PER_BLOCK  # blocks b whose chunks < PER_BLOCK (b + 1) all count
    b_int = tl.minimum(b_begin + tl.maximum(full_blocks - b_begin, 0) // NB * NB, b_comp)
    nb = tl.arange(0, NB)
    carry = tl.full((BQ,), float("-inf"), tl.float32)
    if LOOKBACK:  # noqa: SIM102 - a compile-time branch around a run-time one
        if b_begin > 0:  # the last chunk before this program's blocks, computed as its own tile computes it
            # (the same dot shape gives the same bits: a block and its neighbour tie exactly on a shared chunk)
            cols = (b_begin - NB) * PER_BLOCK + tl.arange(0, NB * PER_BLOCK)
            if b_begin <= full_blocks:
                score = _group_scores(q, K1 + g * sk1h, cols, n1, sk1t, lse2, pos, c, BQ, GPAD, NB * PER_BLOCK, D,
                                      KERNEL, STRIDE, PRECISION, False)
            else:
                score = _group_scores(q, K1 + g * sk1h, cols, n1, sk1t, lse2, pos, c, BQ, GPAD, NB * PER_BLOCK, D,
                                      KERNEL, STRIDE, PRECISION, True)
            carry = tl.max(tl.where(cols[:, None] == b_begin * PER_BLOCK - 1, score, float("-inf")), 0)
    # the interior: the next tile's dot is issued before this tile's exponentials, so the tensor cores work
    # while the exp unit does (ptxas interleaves the two); with the transposed tile, 27.1 -> 21.2 ms for a
    # 16K-query chunk at 1M tokens (64 rows, 128 chunks a tile)
    if b_begin < b_int:
        s = _chunk_dot(q, K1 + g * sk1h, b_begin * PER_BLOCK + tl.arange(0, NB * PER_BLOCK), n1, sk1t, D,
                       PRECISION, False)
        for b0 in range(b_begin, b_int, NB):
            nxt = tl.minimum(b0 + NB, b_int - NB) * PER_BLOCK  # after the last tile, that tile again: no mask
            s_next = _chunk_dot(q, K1 + g * sk1h, nxt + tl.arange(0, NB * PER_BLOCK), n1, sk1t, D, PRECISION,
                                False)
            cols = b0 * PER_BLOCK + tl.arange(0, NB * PER_BLOCK)
            score = _head_scores(s, cols, n1, lse2, pos, c, BQ, GPAD, NB * PER_BLOCK, KERNEL, STRIDE, False)
            carry = _pool_and_store(score, carry, b0, qb, q_rows, T, b_end, KEYS + g * skeyh, skeyt, BQ, NB,
                                    PER_BLOCK, LOOKBACK, INIT, LOCAL)
            s = s_next
    for b0 in range(b_int, b_comp, NB):
        cols = b0 * PER_BLOCK + tl.arange(0, NB * PER_BLOCK)
        score = _group_scores(q, K1 + g * sk1h, cols, n1, sk1t, lse2, pos, c, BQ, GPAD, NB * PER_BLOCK, D,
                              KERNEL, STRIDE, PRECISION, True)
        carry = _pool_and_store(score, carry, b0, qb, q_rows, T, b_end, KEYS + g * skeyh, skeyt, BQ, NB, PER_BLOCK,
                                LOOKBACK, INIT, LOCAL)
    # blocks none of whose chunks the tile's queries see: 0 where a chunk exists (invisible chunks score 0,
    # as in the reference), -inf where none does
    first_tile = b_begin + tl.cdiv(b_comp - b_begin, NB) * NB
    for b0 in range(first_tile, b_end, NB):
        blocks = b0 + nb
        some = tl.maximum(blocks * PER_BLOCK - LOOKBACK, 0) < n1
        pooled = tl.where(some[None, :], 0.0, float("-inf")) + tl.zeros((BQ, NB), tl.float32)
        key = _pack_keys(pooled, blocks, qb, INIT, LOCAL)
        ok = (q_rows[:, None] < T) & (blocks[None, :] < b_end)
        tl.store(KEYS + g * skeyh + q_rows[:, None] * skeyt + blocks[None, :], key, mask=ok)


@triton.jit(do_not_specialize=["T", "n1", "n_blocks", "q_pos0"])
def _tile_score_kernel(
    Q, K1, LSE, KEYS, T, n1, n_blocks, q_pos0, scale, sqh, sqt, sk1h, sk1t, skeyh, skeyt,
    GROUP: tl.constexpr, GPAD: tl.constexpr, BQ: tl.constexpr, D: tl.constexpr, NB: tl.constexpr,
    BLOCK: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr, WIDTH: tl.constexpr,
    INIT: tl.constexpr, LOCAL: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):
    """Any geometry: for each of WIDTH offsets, the chunk at that offset of every block in the tile."""
    btile, tile, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    head, qi, valid, pos = _rows(tile, g, T, q_pos0, GROUP, GPAD, BQ)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + head[:, None] * sqh + qi[:, None] * sqt + offs_d[None, :], mask=valid[:, None], other=0.0)
    lse = _merged_lse(LSE, head, qi, valid, T, tl.num_programs(2) * GROUP, SPLITS)
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
        score = tl.sum(tl.reshape(prob, (BQ, GPAD, NB)), 1)  # summed over the group's heads
        pooled = tl.where(exists[None, :], tl.maximum(pooled, score), pooled)
    q_rows = tile * BQ + tl.arange(0, BQ)
    qb = (q_pos0 + q_rows) // BLOCK
    key = _pack_keys(pooled, blocks, qb, INIT, LOCAL)
    ok = (q_rows[:, None] < T) & (blocks[None, :] < n_blocks)
    tl.store(KEYS + g * skeyh + q_rows[:, None] * skeyt + blocks[None, :], key, mask=ok)


TOPK_TILE = 1024


def _top_blocks(keys: torch.Tensor, k: int, tile: int, method: str = "topk") -> torch.Tensor:
    """Block ids of the k largest keys of each row, ascending: the reference of `top_blocks_triton`, and what
    runs off the GPU. The block id is in the key's low 32 bits. `method` "sort" sorts each row whole instead
    (the same set: keys are unique), for benchmarks to compare."""
    if method == "sort":
        best = keys.sort(dim=-1, descending=True).values[..., :k]
    else:
        if tile:  # blocks past the row's end were written as -inf scores: never above a real block
            keys = keys.unflatten(-1, (-1, tile)).topk(k, dim=-1, sorted=False).values.flatten(-2)
        best = keys.topk(k, dim=-1, sorted=False).values
    return (2147483647 - (best & 0xFFFFFFFF)).sort(-1).values


def flash_geometry(p: SparseParams) -> tuple[int, int] | None:
    """(chunks a block owns, chunks of the previous block it overlaps) where the flash scorer applies."""
    if p.block_size % p.kernel_stride or p.kernel_size % p.kernel_stride:
        return None
    per, lookback = p.block_size // p.kernel_stride, p.kernel_size // p.kernel_stride - 1
    if per & (per - 1) or lookback not in (0, 1) or per > 64:
        return None
    return per, lookback


def _group_rows(group: int, rows: int) -> tuple[int, int]:
    """(padded group, queries per tile): GPAD * BQ = rows (at least the group), both powers of two."""
    gpad = triton.next_power_of_2(group)
    return gpad, max(1, rows // gpad)


def _launch_flash(qs, k1, lse, keys, n, n1, width, pos0, scale, geometry, p, group, gpad, bq, d, tiles, kv_heads,
                  splits, precision, num_warps, num_stages, block_tile, block_splits):
    per, lookback = geometry
    # 64 level-1 chunks a tile at prefill (128 rows; a one-head group's 64 rows spill registers with 128
    # chunks), 128 at decode (16 rows)
    nb = block_tile or max(1, (64 if gpad * bq >= 128 or (gpad == 1 and bq > 16) else 128) // per)
    # few query tiles (decode, a short chunk) would leave the GPU idle: split the blocks over programs,
    # each at least 4 tiles (a split recomputes the tile before its first block)
    want = block_splits or max(1, min(triton.cdiv(width, 4 * nb), triton.cdiv(264, tiles * kv_heads)))
    per_split = triton.cdiv(triton.cdiv(width, want), nb) * nb
    _flash_score_kernel[(tiles, kv_heads, triton.cdiv(width, per_split))](
        qs, k1, lse, keys, n, n1, width, pos0, float(scale), per_split, qs.stride(0), qs.stride(1),
        k1.stride(0), k1.stride(1), keys.stride(0), keys.stride(1),
        GROUP=group, GPAD=gpad, BQ=bq, D=d, NB=nb, PER_BLOCK=per, LOOKBACK=lookback,
        BLOCK=p.block_size, KERNEL=p.kernel_size, STRIDE=p.kernel_stride, INIT=p.init_blocks,
        LOCAL=p.local_blocks, SPLITS=splits, PRECISION=precision,
        # 128 rows against tiles of 64 chunks on 4 warps at prefill: 18.7 ms for a 16K-query chunk at 1M
        # tokens against 21.2 with 64 rows and 128 chunks, 23.5 with 128 rows on 8 warps (H200,
        # bench/RESULTS.md)
        num_warps=num_warps or 4, num_stages=num_stages,
    )


_FLASH_FAILED: list[str] = []  # why the flash scorer failed in this process, if it did
_TOPK_FAILED: list[str] = []  # why the Triton top-k failed in this process, if it did


def _chosen_blocks(keys: torch.Tensor, k: int, method: str, forced: bool, tile: int, tiled: bool) -> torch.Tensor:
    """The k best blocks of each row by `method`: "triton", or `_top_blocks`'s "topk" or "sort"."""
    if method == "triton":
        if forced or (not _TOPK_FAILED and fits(keys.shape[-1], k, tile)):
            try:
                return top_blocks_triton(keys, k, row=tile)
            except Exception as e:
                if forced or isinstance(e, torch.OutOfMemoryError):
                    raise
                # as with the flash scorer: torch.topk chooses the same blocks, more slowly; say so once
                _TOPK_FAILED.append(f"{type(e).__name__}: {e}")
                warnings.warn(f"Triton top-k unavailable ({type(e).__name__}); using torch.topk", RuntimeWarning,
                              stacklevel=3)
        method = "topk"  # over the whole row: the Triton kernel's rows are not padded to torch.topk's tiles
    return _top_blocks(keys, k, tile if tiled else 0, method)


def select_blocks_triton(q, k1, k2, q_pos0: int, params: SparseParams, scale: float, query_tile: int = 4096,
                         topk_tile: int | None = None, scorer: str | None = None, num_warps: int | None = None,
                         num_stages: int = 3, block_tile: int | None = None, block_splits: int | None = None,
                         rows: int = 128, topk_method: str | None = None):
    """Same contract as select_blocks_ref: idx [Hkv, T, topk + local] (ascending ids, then -1).
    `scorer` "flash" or "tile" forces one (tests, benchmarks); by default the flash scorer where it applies.
    `topk_method` "triton" (the default on CUDA), "topk" (torch.topk, the default elsewhere) or "sort" forces
    how the best blocks are found; `topk_tile` is the width of a tile of the two-round top-k (a Triton
    program's row, TOPK_ROW, or torch.topk's tile, TOPK_TILE), small in tests to cross tile edges.
    `block_tile` (blocks a tile of the flash scorer) and `block_splits` (programs sharing a row of blocks)
    let tests cross tile and split edges at small shapes; `rows` (query rows a program at prefill, all heads of
    its queries) and the warps and stages are for tuning."""
    heads, t, d = q.shape
    kv_heads, n1, n2 = k1.shape[0], k1.shape[1], k2.shape[1]
    group = heads // kv_heads
    p = params
    q = q if q.stride(-1) == 1 else q.contiguous()
    k1 = k1 if k1.stride(-1) == 1 else k1.contiguous()
    k2 = k2 if k2.stride(-1) == 1 else k2.contiguous()
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    geometry = flash_geometry(p)
    if scorer == "flash" and geometry is None:
        raise ValueError(f"the flash scorer does not apply to {p}")
    flash = geometry is not None and scorer != "tile" and (scorer == "flash" or not _FLASH_FAILED)
    method = topk_method or ("triton" if q.is_cuda and not _TOPK_FAILED else "topk")
    topk_tile = topk_tile or (TOPK_ROW if method == "triton" else TOPK_TILE)
    # a one-head group's 128 queries in 128 rows spill registers: 64 rows for it
    gpad, bq = _group_rows(group, (rows if group > 1 else min(rows, 64)) if t > 1 else 16)
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
            GROUP=group, GPAD=gpad, BQ=bq, D=d, BN=64, KERNEL=p.kernel_size, STRIDE=p.kernel_stride,
            SPLITS=splits, PRECISION=precision, num_warps=num_warps or (8 if gpad * bq >= 128 else 4),
        )
        # torch.topk takes a long row in two rounds (the best of each tile of blocks, then the best of those):
        # the same set, as keys are unique, and far more parallel than one radix select over 16K blocks. The
        # Triton top-k tiles a row itself and needs no padding.
        tiled = method == "topk" and n_blocks > 2 * topk_tile and p.selected <= topk_tile
        width = triton.cdiv(n_blocks, topk_tile) * topk_tile if tiled else n_blocks
        keys = torch.empty(kv_heads, n, width, dtype=torch.int64, device=q.device)
        if flash:
            try:
                _launch_flash(qs, k1, lse, keys, n, n1, width, pos0, scale, geometry, p, group, gpad, bq, d, tiles,
                              kv_heads, splits, precision, num_warps, num_stages, block_tile, block_splits)
            except Exception as e:
                if scorer == "flash" or isinstance(e, torch.OutOfMemoryError):
                    raise
                # a compiler or resource failure of the newer scorer on this GPU must not stop reading: the
                # tile scorer computes the same keys; say so once, and keep to it in this process
                _FLASH_FAILED.append(f"{type(e).__name__}: {e}")
                warnings.warn(f"flash block scorer unavailable ({type(e).__name__}); using the tile scorer",
                              RuntimeWarning, stacklevel=2)
                flash = False
        if not flash:
            tgpad, tbq = _group_rows(group, 64 if t > 1 else 16)
            chunks = (p.block_size + p.kernel_size - 2) // p.kernel_stride + 1  # chunks overlapping a block
            _tile_score_kernel[(triton.cdiv(width, 64), triton.cdiv(n, tbq), kv_heads)](
                qs, k1, lse, keys, n, n1, width, pos0, float(scale),
                qs.stride(0), qs.stride(1), k1.stride(0), k1.stride(1), keys.stride(0), keys.stride(1),
                GROUP=group, GPAD=tgpad, BQ=tbq, D=d, NB=64, BLOCK=p.block_size, KERNEL=p.kernel_size,
                STRIDE=p.kernel_stride, WIDTH=chunks, INIT=p.init_blocks, LOCAL=p.local_blocks, SPLITS=splits,
                PRECISION=precision,
            )
        k = min(p.selected, n_blocks)
        chosen = _chosen_blocks(keys, k, method, topk_method == "triton", topk_tile, tiled)
        if t == 1 and pos0 // p.block_size + 1 >= p.selected:  # decode past the first blocks: every slot real
            return chosen.to(torch.int32)
        if out is None:
            out = torch.full((kv_heads, t, p.selected), -1, dtype=torch.int32, device=q.device)
        qb = torch.div(torch.arange(pos0, pos0 + n, device=q.device), p.block_size, rounding_mode="floor")
        count = torch.clamp(qb + 1, max=p.selected)
        keep = torch.arange(chosen.shape[-1], device=q.device)[None, :] < count[:, None]
        out[:, begin : begin + n, : chosen.shape[-1]] = torch.where(keep[None], chosen, -1).to(torch.int32)
    return out
