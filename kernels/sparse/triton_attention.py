"""Block-sparse flash attention in Triton, for prefill (a tile of queries) and decode (one query).

Same contract as `block_sparse_attention_ref`. One program serves one KV group and BQ consecutive queries,
all the group's heads stacked as rows (GROUP x BQ rows share each K/V block load, as in GQA flash decoding).
Queries close together select nearly the same blocks, so the program walks the union of its queries'
selections (built on the host side of the launch with two sorts, no Python loop) and masks, per row, the
blocks that row's query did not select: a bitmask per union block, bit i = query i selected it.
Online softmax in fp32; the K/V loads and both matmuls in the input dtype on tensor cores.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl


# lengths and positions change every decode step: compile once, not once per divisibility class
@triton.jit(do_not_specialize=["T", "length", "q_pos0"])
def _block_sparse_kernel(
    Q, K, V, O, PART_LSE, UNION, BITS, COUNT, BLOCK_POS, T, length, q_pos0, scale,
    sqh, sqt, skh, skt, svh, svt, soh, sot, s_uh, s_ut,
    GROUP: tl.constexpr, GPAD: tl.constexpr, BQ: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
    HAS_BLOCK_POS: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr, SLOTS: tl.constexpr,
):
    """SLOTS > 0 (decode, one query a tile): UNION is the selection itself, SLOTS wide, -1 padded, every
    listed block chosen by the query; no union, bitmask or count is built on the host. The group is padded
    to GPAD heads (a power of two, as tl.arange needs); the padded rows load nothing and store nothing."""
    tile, g, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tl.arange(0, GPAD * BQ)
    hrow = rows // BQ
    head = g * GROUP + tl.minimum(hrow, GROUP - 1)
    local = rows % BQ
    qi = tile * BQ + local
    valid = (qi < T) & (hrow < GROUP)
    pos = q_pos0 + qi
    offs_d = tl.arange(0, D)
    offs_b = tl.arange(0, BLOCK)
    q = tl.load(Q + head[:, None] * sqh + qi[:, None] * sqt + offs_d[None, :], mask=valid[:, None], other=0.0)
    m = tl.full((GPAD * BQ,), -1.0e30, tl.float32)  # finite: a row that sees nothing yet must not make NaN
    l_sum = tl.zeros((GPAD * BQ,), tl.float32)
    acc = tl.zeros((GPAD * BQ, D), tl.float32)
    if SLOTS > 0:
        count = SLOTS
    else:
        count = tl.load(COUNT + g * tl.num_programs(0) + tile)
    base = g * s_uh + tile * s_ut
    for u in range(split, count, SPLITS):  # with SPLITS > 1 (decode) programs share the blocks
        block = tl.load(UNION + base + u)
        if SLOTS > 0:
            member = (local * 0 + block) >= 0  # -1 padding: nothing is seen
            block = tl.maximum(block, 0)
        else:
            bits = tl.load(BITS + base + u)
            member = ((bits >> local) & 1) == 1
        if HAS_BLOCK_POS:
            origin = tl.load(BLOCK_POS + block)
        else:
            origin = block
        tok = block * BLOCK + offs_b
        inside = tok < length
        k = tl.load(K + g * skh + tok[:, None] * skt + offs_d[None, :], mask=inside[:, None], other=0.0)
        v = tl.load(V + g * svh + tok[:, None] * svt + offs_d[None, :], mask=inside[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        seen = member[:, None] & inside[None, :] & (origin * BLOCK + offs_b[None, :] <= pos[:, None])
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
    if SPLITS > 1:  # partial results, merged by their log-sum-exp on the host side
        O += split * tl.num_programs(1) * GROUP * T * D
        lse = tl.where(l_sum == 0.0, float("-inf"), m + tl.log(l_sum))
        tl.store(PART_LSE + (split * tl.num_programs(1) * GROUP + head) * T + qi, lse, mask=valid)
    tl.store(O + head[:, None] * soh + qi[:, None] * sot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=valid[:, None])


@triton.jit
def _merge_splits_kernel(PART, PART_LSE, O, rows, splits, SPLITS: tl.constexpr, D: tl.constexpr):
    """out[r] = sum over splits of softmax(lse)[s] * part[s, r]; splits that saw nothing weigh 0."""
    r = tl.program_id(0)
    split = tl.arange(0, SPLITS)  # SPLITS: splits rounded up to a power of two
    offs_d = tl.arange(0, D)
    lse = tl.load(PART_LSE + split * rows + r, mask=split < splits, other=float("-inf"))
    top = tl.max(lse, 0)
    weight = tl.exp(lse - tl.where(top == float("-inf"), 0.0, top))
    weight = weight / tl.maximum(tl.sum(weight, 0), 1e-30)
    part = tl.load(PART + (split[:, None] * rows + r) * D + offs_d[None, :], mask=split[:, None] < splits, other=0.0)
    tl.store(O + r * D + offs_d, tl.sum(part * weight[:, None], 0).to(O.dtype.element_ty))


def _tile_queries(group: int, t: int) -> int:
    """Queries a program: a power of two, with at least 16 rows (the smallest tensor-core tile) in all."""
    gpad = triton.next_power_of_2(group)
    if t == 1:
        return max(1, 16 // gpad)
    return min(16, max(1, 64 // gpad))


@triton.jit(do_not_specialize=["T"])
def _union_kernel(IDX, UNION, BITS, COUNT, T, K, s_ih, s_it, BQ: tl.constexpr, KPAD: tl.constexpr,
                  WIDTH: tl.constexpr):
    """Program (tile, g): union_of_selections for one tile of BQ queries. The tile's selections as keys
    block * 32 + query, sorted; a key whose block differs from the one before it starts a run (at most BQ long:
    a query lists a block once), its slot is the count of run starts before it, and its bitmask the OR of the
    run's queries."""
    tile, g = tl.program_id(0), tl.program_id(1)
    e = tl.arange(0, BQ * KPAD)
    query = e // KPAD
    qi = tile * BQ + query
    ok = (qi < T) & (e % KPAD < K)
    block = tl.load(IDX + g * s_ih + qi * s_it + e % KPAD, mask=ok, other=-1)
    none: tl.constexpr = 1 << 62  # after every real key
    key = tl.sort(tl.where(block >= 0, block.to(tl.int64) * 32 + query, none))
    real = key < none
    prev = tl.gather(key, tl.maximum(e - 1, 0), 0)
    first = real & ((e == 0) | ((prev >> 5) != (key >> 5)))
    bits = tl.full((BQ * KPAD,), 1, tl.int32) << (key & 31).to(tl.int32)
    for i in tl.static_range(1, BQ):
        nxt = tl.gather(key, tl.minimum(e + i, BQ * KPAD - 1), 0)
        same = (e + i < BQ * KPAD) & (nxt < none) & ((nxt >> 5) == (key >> 5))
        bits = bits | tl.where(same, tl.full((BQ * KPAD,), 1, tl.int32) << (nxt & 31).to(tl.int32), 0)
    slot = tl.cumsum(first.to(tl.int32), 0) - 1
    count = tl.sum(first.to(tl.int32), 0)
    row = (g * tl.num_programs(0) + tile).to(tl.int64) * WIDTH
    tl.store(UNION + row + slot, (key >> 5).to(tl.int32), mask=first)
    tl.store(BITS + row + slot, bits, mask=first)
    rest = (e >= count) & (e < WIDTH)  # past the union: the sentinel, no query
    tl.store(UNION + row + e, tl.full((BQ * KPAD,), 2147483647, tl.int32), mask=rest)
    tl.store(BITS + row + e, tl.zeros((BQ * KPAD,), tl.int32), mask=rest)
    tl.store(COUNT + g * tl.num_programs(0) + tile, count)


_UNION_FAILED: list[str] = []  # why the Triton union kernel failed in this process, if it did


def union_of_selections(idx: torch.Tensor, bq: int, method: str | None = None):
    """Per (group, tile of bq queries): the sorted distinct selected blocks, how many, and for each a bitmask
    of the tile's queries that selected it. idx [Hkv, T, K] (-1 padding) → ([Hkv, n, bq*K] x2, [Hkv, n]).
    `method` "triton" or "torch" forces how (by default _union_kernel on CUDA: one kernel where torch took
    two sorts, a searchsorted and a scatter, ~2 ms of GPU time a layer for a 64K-query chunk)."""
    kv_heads, t, k = idx.shape
    if bq > 1 and method != "torch" and (method == "triton" or idx.is_cuda and not _UNION_FAILED):
        try:
            return _union_triton(idx, bq)
        except Exception as e:
            if method == "triton" or isinstance(e, torch.OutOfMemoryError):
                raise
            _UNION_FAILED.append(f"{type(e).__name__}: {e}")
            warnings.warn(f"Triton union of selections unavailable ({type(e).__name__}); using torch",
                          RuntimeWarning, stacklevel=2)
    return _union_torch(idx, bq)


def _union_triton(idx: torch.Tensor, bq: int):
    kv_heads, t, k = idx.shape
    idx = idx if idx.stride(-1) == 1 else idx.contiguous()
    tiles = -(-t // bq)
    union = torch.empty(kv_heads, tiles, bq * k, dtype=torch.int32, device=idx.device)
    bits = torch.empty_like(union)
    count = torch.empty(kv_heads, tiles, dtype=torch.int32, device=idx.device)
    _union_kernel[(tiles, kv_heads)](idx, union, bits, count, t, k, idx.stride(0), idx.stride(1), BQ=bq,
                                     KPAD=triton.next_power_of_2(k), WIDTH=bq * k)
    return union, bits, count


def _union_torch(idx: torch.Tensor, bq: int):
    kv_heads, t, k = idx.shape
    tiles = -(-t // bq)
    sentinel = torch.iinfo(torch.int32).max
    if bq == 1:  # decode: a selection is already sorted and distinct, -1 padding last; every bit is set
        union = torch.where(idx >= 0, idx, sentinel).to(torch.int32).contiguous()
        return union, torch.ones_like(union), (idx >= 0).sum(-1).to(torch.int32).contiguous()
    padded = torch.full((kv_heads, tiles * bq, k), -1, dtype=torch.int32, device=idx.device)
    padded[:, :t] = idx
    sel = padded.view(kv_heads, tiles, bq, k)
    flat = torch.where(sel >= 0, sel, sentinel).reshape(kv_heads, tiles, bq * k)
    ordered = flat.sort(-1).values
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[..., 1:] = ordered[..., 1:] == ordered[..., :-1]
    union = torch.where(repeat, sentinel, ordered).sort(-1).values.contiguous()
    count = (union != sentinel).sum(-1).to(torch.int32).contiguous()
    # where each selected block sits in its tile's union; each query selects a block at most once, so adding
    # the query's bit is an OR
    slot = torch.searchsorted(union, flat.contiguous()).clamp(max=bq * k - 1)
    query_bit = (1 << torch.arange(bq, device=idx.device, dtype=torch.int64)).repeat_interleave(k)
    contrib = torch.where(flat != sentinel, query_bit, 0)
    bits = torch.zeros(kv_heads, tiles, bq * k, dtype=torch.int64, device=idx.device)
    bits.scatter_add_(-1, slot, contrib)
    return union, bits.to(torch.int32).contiguous(), count


def block_sparse_attention_triton(q, k, v, idx, q_pos0: int, block_size: int, scale: float,
                                  block_pos: torch.Tensor | None = None, query_tile: int | None = None,
                                  splits: int | None = None, num_warps: int = 4, num_stages: int = 3,
                                  union_method: str | None = None):
    """`query_tile`, `splits`, the warps and the stages are for tests and tuning; `union_method` "torch" or "triton"
    forces how a prefill tile's union of selections is built (by default the Triton kernel on CUDA)."""
    heads, t, d = q.shape
    kv_heads, length, _ = k.shape
    group = heads // kv_heads
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    bq = query_tile or _tile_queries(group, t)
    assert bq <= 31, "the per-block query bitmask is an int32"
    if bq == 1:  # decode: the selection is its own union, every block chosen by the one query
        union = bits = count = idx if idx.is_contiguous() else idx.contiguous()
        slots = idx.shape[-1]
    else:
        union, bits, count = union_of_selections(idx, bq, union_method)
        slots = 0
    # few query tiles would leave most of the GPU idle: split each tile's blocks over programs; a decoded
    # token, one block a program (H200, 1M tokens, 96 blocks: 8.1 us against 12.7 in 16 splits)
    splits = splits or (1 if union.shape[1] * kv_heads >= 64 else min(slots, 128) if slots else 16)
    if splits == 1:
        out, part_lse = torch.empty_like(q), count
    else:
        out = torch.empty(splits, heads, t, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(splits, heads, t, dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    positions = block_pos.to(device=q.device, dtype=torch.int32).contiguous() if block_pos is not None else count
    _block_sparse_kernel[(union.shape[1], kv_heads, splits)](
        q, k, v, out, part_lse, union, bits, count, positions, t, length, q_pos0, float(scale),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(-3), out.stride(-2),
        union.stride(0), union.stride(1),
        GROUP=group, GPAD=triton.next_power_of_2(group), BQ=bq, D=d, BLOCK=block_size, HAS_BLOCK_POS=block_pos is not None, SPLITS=splits,
        PRECISION=precision, SLOTS=slots, num_warps=num_warps, num_stages=num_stages,
    )
    if splits == 1:
        return out
    merged = torch.empty(heads, t, d, dtype=q.dtype, device=q.device)
    _merge_splits_kernel[(heads * t,)](out, part_lse, merged, heads * t, splits,
                               SPLITS=triton.next_power_of_2(splits), D=d)
    return merged
