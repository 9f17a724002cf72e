"""The k largest block-selection keys of each row, exactly, in Triton; the block ids come out ascending.

The reference is `triton_select._top_blocks` (torch.topk, then a sort of the ids). Keys are unique int64s
    key = monotone_int32(score) * 2^32 + (2^31 - 1 - block)
so the k-th largest key is a threshold that exactly k keys reach. `_kth_largest` finds it by bisection over
keys held in registers: over the high word (the score) first, 32 steps at most, each a count against a
candidate; then, only where scores tie across the threshold, over the block ids of the tied keys (ties go to
the lower block, as in the reference). The keys at or above it are written in column order through a prefix
sum of the mask: columns are blocks in ascending order, so the ids need no sort.

A count costs a few instructions a key, and 32 of them over a 16K-block row left the first version at a
tenth of the memory bandwidth (H200, 1M tokens). The groups kernel (the default) reads the row once for the
largest key of each group of a few columns. The k groups with the largest maxima hold all of the top k keys,
so both searches run over a few thousand keys instead of the row: the maxima, then the chosen groups' keys.
The rows kernel searches the whole row; it takes a decoded token's short rows (a shorter chain of steps),
rows narrower than a few groups, and anything too wide for a program of the groups kernel, in two rounds:
the top k keys of each tile of ROW columns (still in column order, so the tiles' outputs concatenated are
too), then the top k of that concatenation, as ids.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

TOPK_ROW = 8192  # columns a program holds: 64 KB of int64 keys, 32 a thread at 8 warps
_WIDEST = 16384  # the widest second round a program takes (8 warps hold it without spilling on sm_90)
_SHARED = 2048  # keys a program of the rows kernel at least takes: narrow rows share one
_GROUPED_MAX = 4096  # group maxima, or keys of the chosen groups, that a program of the groups kernel holds
_STEP = 2048  # keys a step of the groups kernel's first pass reads
_GROUPED_FROM = 256  # columns from which rows go by groups by default (measured faster from 256 on an H200)
_FEW_ROWS = 256  # fewer rows than this (decode, a short chunk) leave most of the GPU idle ...
_SHORT = 2048  # ... and are taken by rows up to this width
_LOWEST = tl.constexpr(-(2**63))  # below every real key (a real key's low word is 2^31 - 1 - block > 0)


@triton.jit
def _kth_largest(score, block, kk):
    """For each row of keys [R, N], split into score (high word) and block: the kk-th largest key, as its score
    and block [R]. Columns read as the lowest key (padding) are below every real one and never reach it."""
    # the largest s with count(score >= s) >= kk: the score of the kk-th largest key
    lo = tl.min(score, 1).to(tl.int64)
    hi = tl.max(score, 1).to(tl.int64)
    while tl.max(hi - lo, 0) > 0:
        mid = (lo + hi + 1) >> 1
        enough = tl.sum((score >= mid.to(tl.int32)[:, None]).to(tl.int32), 1) >= kk
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    at = lo.to(tl.int32)[:, None]
    need = kk - tl.sum((score > at).to(tl.int32), 1)  # the lowest `need` blocks of those whose score is `at`
    # the need-th lowest of those blocks: a search only where more keys tie there than are needed
    b_hi = tl.max(tl.where(score == at, block, 0), 1).to(tl.int64)
    b_lo = tl.where(tl.sum((score == at).to(tl.int32), 1) > need,
                    tl.min(tl.where(score == at, block, 2147483647), 1).to(tl.int64), b_hi)
    while tl.max(b_hi - b_lo, 0) > 0:
        mid = (b_lo + b_hi) >> 1
        enough = tl.sum(((score == at) & (block <= mid.to(tl.int32)[:, None])).to(tl.int32), 1) >= need
        b_lo = tl.where(enough, b_lo, mid + 1)
        b_hi = tl.where(enough, mid, b_hi)
    return lo.to(tl.int32), b_lo.to(tl.int32)


@triton.jit
def _split(x):
    """A key's score (high word) and block (the low word holds 2^31 - 1 - block)."""
    return (x >> 32).to(tl.int32), 2147483647 - x.to(tl.int32)


@triton.jit
def _at_or_above(score, block, at, at_block):
    """Keys at or above the threshold (at, at_block) [R], as a mask of [R, N]."""
    return (score > at[:, None]) | ((score == at[:, None]) & (block <= at_block[:, None]))


@triton.jit(do_not_specialize=["n_rows", "width", "k"])
def _topk_rows_kernel(KEYS, OUT, n_rows, width, k, s_key, s_out, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                      IDS: tl.constexpr):
    """Program (r, tile): for ROWS rows, the top min(k, columns of the tile) keys of KEYS[row, tile*BLOCK : +BLOCK]
    in column order, to OUT[row, tile*k : +k]: as block ids (IDS), or as keys with the slots past the tile's
    columns filled with keys below every real one (round 1 of a wide row)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    tile = tl.program_id(1)
    cols = tile * BLOCK + tl.arange(0, BLOCK)
    kk = tl.minimum(k, width - tile * BLOCK)
    # columns past the row read as the lowest key: below the kk-th largest real one, so never counted at the
    # threshold and needing no mask of their own (a live mask would cost a register a column)
    x = tl.load(KEYS + rows[:, None] * s_key + cols[None, :], mask=(rows[:, None] < n_rows) & (cols[None, :] < width),
                other=_LOWEST)
    score, block = _split(x)
    at, at_block = _kth_largest(score, block, kk)
    chosen = _at_or_above(score, block, at, at_block)  # kk columns a row
    out = OUT + rows[:, None] * s_out + tile * k + tl.cumsum(chosen.to(tl.int32), 1) - 1
    chosen = chosen & (rows[:, None] < n_rows)
    if IDS:
        tl.store(out, block, mask=chosen)
    else:
        # the key again from its halves: x itself need not stay live through the search
        tl.store(out, (score.to(tl.int64) << 32) | (2147483647 - block).to(tl.int64), mask=chosen)
        if kk < k:  # a last tile narrower than k: its spare slots can never be chosen in round 2
            pad = tl.arange(0, BLOCK)[None, :]
            tl.store(OUT + rows[:, None] * s_out + tile * k + pad, tl.full((ROWS, BLOCK), _LOWEST, tl.int64),
                     mask=(rows[:, None] < n_rows) & (pad >= kk) & (pad < k))


@triton.jit(do_not_specialize=["width", "k"])
def _topk_groups_kernel(KEYS, OUT, width, k, s_key, s_out, GROUP: tl.constexpr, GROUPS: tl.constexpr,
                        CHUNK: tl.constexpr, KPAD: tl.constexpr):
    """Program `row`: block ids of the top k keys of KEYS[row, :width], ascending, to OUT[row, :k]. The row is
    read once, for the largest key of each group of GROUP columns; the k groups with the largest maxima hold
    all of the top k keys (a key among them lifts its group's maximum at least as high), so the search runs
    over GROUPS maxima and then over the k * GROUP keys of those groups, read again (from L2, mostly)."""
    row = tl.program_id(0).to(tl.int64)
    keys, out = KEYS + row * s_key, OUT + row * s_out
    member = tl.arange(0, GROUP)
    g = tl.arange(0, CHUNK)
    chunk = tl.arange(0, GROUPS // CHUNK)
    maxima = tl.full((GROUPS // CHUNK, CHUNK), _LOWEST, tl.int64)
    for c in range(GROUPS // CHUNK):  # CHUNK groups at a time, so a program holds few keys
        cols = (c * CHUNK + g)[:, None] * GROUP + member[None, :]
        x = tl.load(keys + cols, mask=cols < width, other=_LOWEST)
        maxima = tl.where(chunk[:, None] == c, tl.max(x, 1)[None, :], maxima)
    maxima = tl.reshape(maxima, (1, GROUPS))
    score, block = _split(maxima)
    at, at_block = _kth_largest(score, block, k)
    chosen = _at_or_above(score, block, at, at_block)  # exactly k groups (at least k hold real keys)
    # the chosen groups' indices, ascending, through the output row (k slots: exactly enough)
    tl.store(out + tl.cumsum(chosen.to(tl.int32), 1) - 1, tl.arange(0, GROUPS)[None, :], mask=chosen)
    tl.debug_barrier()
    slot = tl.arange(0, KPAD)
    group = tl.load(out + slot, mask=slot < k, other=0)
    tl.debug_barrier()  # every thread has read the indices before the ids overwrite them
    cols = group[:, None] * GROUP + member[None, :]  # groups ascending, columns within each: column order
    x = tl.load(keys + cols, mask=(slot[:, None] < k) & (cols < width), other=_LOWEST)
    score, block = _split(tl.reshape(x, (1, KPAD * GROUP)))
    at, at_block = _kth_largest(score, block, k)
    chosen = _at_or_above(score, block, at, at_block)
    tl.store(out + tl.cumsum(chosen.to(tl.int32), 1) - 1, block, mask=chosen)


def pack_keys(scores: torch.Tensor) -> torch.Tensor:
    """The scorers' keys for fp32 `scores` [..., blocks] (block = column), in torch: for tests and benchmarks."""
    bits = scores.float().contiguous().view(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # the floats' order as signed integers
    block = torch.arange(scores.shape[-1], device=scores.device)
    return bits.to(torch.int64) * 4294967296 + (2147483647 - block)


def _grouping(width: int, k: int, group: int | None) -> tuple[int, int] | None:
    """(columns a group, groups padded to a power of two) for the groups kernel, or None where it cannot take
    the row: too few groups for k, or more keys than a program holds."""
    kpad = triton.next_power_of_2(k)
    if group is None:  # measured best on an H200: group ~ sqrt(width / k), rounded down (8 at 16K blocks)
        root = math.isqrt(width // kpad)
        group = max(2, 1 << (root.bit_length() - 1)) if root else 2
    if group < 2 or triton.cdiv(width, group) < k:
        return None
    groups = triton.next_power_of_2(triton.cdiv(width, group))
    return (group, groups) if max(groups, kpad * group) <= _GROUPED_MAX else None


def _by_rows_fits(width: int, k: int, row: int) -> bool:
    return width <= row or (k <= row and triton.cdiv(width, row) * k <= _WIDEST)


def fits(width: int, k: int, row: int = TOPK_ROW, group: int | None = None) -> bool:
    """Whether top_blocks_triton takes rows of `width` keys: by groups, or by rows in one round or two whose
    second fits a program."""
    return 1 <= k <= width and (_grouping(width, k, group) is not None or (group is None or group == 0)
                                and _by_rows_fits(width, k, row))


def _by_rows(keys, out, width, k, block, ids, tiles=1, num_warps=None):
    # narrow rows share a program (keys a program: at least _SHARED where the rows allow)
    n_rows = keys.shape[0]
    rows = min(max(1, _SHARED // block), triton.next_power_of_2(n_rows))
    warps = num_warps or (8 if rows * block >= 4096 else 4)
    _topk_rows_kernel[(triton.cdiv(n_rows, rows), tiles)](
        keys, out, n_rows, width, k, keys.stride(0), out.stride(0), ROWS=rows, BLOCK=block, IDS=ids, num_warps=warps)


def top_blocks_triton(keys: torch.Tensor, k: int, row: int = TOPK_ROW, group: int | None = None,
                      num_warps: int | None = None) -> torch.Tensor:
    """Block ids [..., k] (int32, ascending) of the k largest keys of each row of `keys` [..., width], the
    scorers' int64 sort keys. Rows go by groups of `group` columns (by default where that pays; 0: never),
    or else by rows, in tiles of `row` columns (a power of two). These and the warps are for tests and
    tuning; every choice gives the same ids."""
    width = keys.shape[-1]
    if not fits(width, k, row, group):
        raise ValueError(f"top_blocks_triton takes 1 <= k <= width and either at least k groups (of {group}) or, "
                         f"past {row} columns, k <= {row} and ceil(width / {row}) * k <= {_WIDEST}: "
                         f"got k {k}, width {width}")
    flat = keys.reshape(-1, width)
    flat = flat if flat.stride(-1) == 1 else flat.contiguous()
    n_rows = flat.shape[0]
    out = torch.empty(*keys.shape[:-1], k, dtype=torch.int32, device=keys.device)
    if n_rows == 0:
        return out
    # a few short rows (decode) finish sooner by rows: the groups kernel's two searches are a longer chain
    few = n_rows < _FEW_ROWS
    by_rows = group == 0 or (group is None and (width < _GROUPED_FROM or few and width <= _SHORT)
                             and _by_rows_fits(width, k, row))
    grouping = None if by_rows else _grouping(width, k, group)
    if grouping is not None:
        group, groups = grouping
        kpad = triton.next_power_of_2(k)
        chunk = min(groups, max(1, _STEP // group))  # groups a step of the first pass
        # one warp a program where there are many (no barriers in the searches), at most 32 keys a thread
        warps = num_warps or max(max(groups, kpad * group) // 1024, 4 if few else 1 if width <= 4096 else 2)
        _topk_groups_kernel[(n_rows,)](flat, out, width, k, flat.stride(0), k, GROUP=group, GROUPS=groups,
                                       CHUNK=chunk, KPAD=kpad, num_warps=warps)
        return out
    if width > row:  # round 1: the best k of each tile, as keys, concatenated in column order
        tiles = triton.cdiv(width, row)
        best = torch.empty(n_rows, tiles * k, dtype=torch.int64, device=keys.device)
        _by_rows(flat, best, width, k, row, False, tiles, num_warps)
        flat, width, num_warps = best, tiles * k, None
    _by_rows(flat, out.view(-1, k), width, k, triton.next_power_of_2(width), True, num_warps=num_warps)
    return out
