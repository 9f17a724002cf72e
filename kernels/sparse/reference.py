"""InfLLM-V2 block-sparse attention in plain PyTorch: compressed keys, block selection, sparse attention.

One sequence, heads-first: q [H, T, D] at absolute positions p = q_pos0 + i; k, v [Hkv, L, D] hold every
cached token; query head h belongs to KV group g = h // (H // Hkv), and a group shares one selection.

Selection, for the query at position p (all in fp32):
  * level-1 keys k1[j] = mean(k[j*stride : j*stride + kernel]); level-2 keys use 4x kernel and 4x stride.
    A compressed key is visible iff its whole chunk lies in tokens 0..p.
  * s1[h,j] = scale q_h . k1[j];  lse_h = logsumexp over visible level-2 keys of scale q_h . k2[j']
    (the coarse keys normalise the fine scores: InfLLM-V2's "compressed LSE"; if no level-2 key is visible
    yet, the visible level-1 keys normalise themselves).
  * score[g,j] = sum over the heads of g of exp(s1 - lse); invisible keys score 0.
  * block b (tokens [bB, (b+1)B)) scores the max over the level-1 chunks that overlap it (-inf if none).
  * forced in (+inf): b < init_blocks and qb - local_blocks <= b <= qb, qb = p // B. Only b <= qb can be
    chosen. With qb + 1 <= topk + local_blocks every such block is taken; otherwise the best
    topk + local_blocks, ties going to the lower block. Output: ascending block ids, then -1 padding.
"""

from __future__ import annotations

import torch
from salachat.kernels.sparse.params import SparseParams

NEG_INF = float("-inf")


def compress_keys_ref(k: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """[Hkv, L, D] → [Hkv, n, D], n = (L - kernel) // stride + 1 chunks that lie fully inside; fp32 mean."""
    heads, length, d = k.shape
    if length < kernel:
        return k.new_empty(heads, 0, d)
    return k.float().unfold(1, kernel, stride).mean(-1).to(k.dtype)


def _overlap_windows(n_blocks: int, n1: int, p: SparseParams, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each block, the level-1 chunk ids that overlap it (padded) and which of them are real."""
    b = torch.arange(n_blocks, device=device)
    lo = torch.clamp(torch.div(b * p.block_size - p.kernel_size, p.kernel_stride, rounding_mode="floor") + 1, min=0)
    hi = torch.div((b + 1) * p.block_size - 1, p.kernel_stride, rounding_mode="floor")
    width = (p.block_size + p.kernel_size - 2) // p.kernel_stride + 1
    ids = lo[:, None] + torch.arange(width, device=device)[None, :]
    valid = (ids <= hi[:, None]) & (ids < n1)
    return ids.clamp(max=max(n1 - 1, 0)), valid


def select_blocks_ref(q, k1, k2, q_pos0: int, params: SparseParams, scale: float, tile: int | None = None) -> torch.Tensor:
    heads, t, d = q.shape
    kv_heads, n1 = k1.shape[0], k1.shape[1]
    n2 = k2.shape[1]
    if tile is None:  # bound the [H, tile, n1] score block: 2 GB on a GPU, 256 MB on the CPU
        budget = (2 << 30) if q.is_cuda else (256 << 20)
        tile = max(16, budget // max(1, 2 * heads * (n1 + n2) * 4))
    group = heads // kv_heads
    p = params
    out = torch.full((kv_heads, t, p.selected), -1, dtype=torch.int32, device=q.device)
    k1f, k2f = k1.float(), k2.float()
    for begin in range(0, t, tile):
        qt = q[:, begin : begin + tile].float().reshape(kv_heads, group, -1, d)
        n = qt.shape[2]
        pos = torch.arange(q_pos0 + begin, q_pos0 + begin + n, device=q.device)
        vis1 = torch.arange(n1, device=q.device)[None, :] * p.kernel_stride + p.kernel_size <= pos[:, None] + 1
        vis2 = torch.arange(n2, device=q.device)[None, :] * 4 * p.kernel_stride + 4 * p.kernel_size <= pos[:, None] + 1
        s1 = torch.einsum("hgtd,hjd->hgtj", qt, k1f) * scale
        s2 = torch.einsum("hgtd,hjd->hgtj", qt, k2f) * scale
        lse2 = torch.logsumexp(s2.masked_fill(~vis2, NEG_INF), dim=-1)
        lse1 = torch.logsumexp(s1.masked_fill(~vis1, NEG_INF), dim=-1)
        lse = torch.where(vis2.any(-1), lse2, lse1)
        probs = torch.exp(s1 - lse[..., None]).masked_fill(~vis1, 0.0)
        score = torch.nan_to_num(probs, nan=0.0).sum(1)  # [Hkv, n, n1]
        qb = torch.div(pos, p.block_size, rounding_mode="floor")
        n_blocks = int(qb.max()) + 1
        ids, valid = _overlap_windows(n_blocks, n1, p, q.device)
        if n1 > 0:
            pooled = score[:, :, ids].masked_fill(~valid, NEG_INF).amax(-1)  # [Hkv, n, n_blocks]
        else:
            pooled = torch.full((kv_heads, n, n_blocks), NEG_INF, device=q.device)
        b = torch.arange(n_blocks, device=q.device)[None, :]
        forced = (b < p.init_blocks) | ((b >= qb[:, None] - p.local_blocks) & (b <= qb[:, None]))
        pooled = pooled.masked_fill(forced[None], float("inf"))
        candidate = b <= qb[:, None]
        # excluded blocks sort after every candidate: -inf scores tie, and stable order favours lower ids
        pooled = pooled.masked_fill(~candidate[None], NEG_INF)
        order = torch.sort(pooled, dim=-1, descending=True, stable=True).indices[..., : p.selected]
        chosen = torch.sort(order, dim=-1).values
        count = torch.clamp(qb + 1, max=p.selected)  # candidates available per query
        keep = torch.arange(chosen.shape[-1], device=q.device)[None, :] < count[:, None]
        chosen = torch.where(keep[None], chosen, torch.full_like(chosen, -1))
        # with fewer candidates than slots, the kept ones are exactly 0..qb (all candidates)
        out[:, begin : begin + n, : chosen.shape[-1]] = chosen.to(torch.int32)
    return out


def block_sparse_attention_ref(q, k, v, idx, q_pos0: int, block_size: int, scale: float,
                               tile: int = 128, block_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Exact softmax attention of each query over the tokens t <= p of its group's selected blocks.

    `block_pos` (int [n]) is for KV kept in a compact buffer (blocks fetched from CPU memory): k, v then hold
    n blocks, idx names compact blocks, and compact block c holds the tokens of block block_pos[c] (which
    is what the causal test compares). Without it, block c is block c.

    Queries close together select nearly the same blocks, so a tile of queries gathers the union of its
    selections once and masks, per query, what that query did not select: the cost grows with the selected
    blocks, not with the context length.
    """
    heads, t, _d = q.shape
    kv_heads, length, _ = k.shape
    group = heads // kv_heads
    out = torch.empty_like(q)
    offsets = torch.arange(block_size, device=q.device)
    compute = torch.float32 if not q.is_cuda else q.dtype  # tensor cores on a GPU, exact fp32 on the CPU
    for begin in range(0, t, tile):
        n = min(tile, t - begin)
        pos = torch.arange(q_pos0 + begin, q_pos0 + begin + n, device=q.device)
        for g in range(kv_heads):
            sel = idx[g, begin : begin + n].long()  # [n, K]
            union = torch.unique(sel[sel >= 0])  # sorted block ids
            member = (sel[:, :, None] == union[None, None, :]).any(1)  # [n, U]
            tokens = (union[:, None] * block_size + offsets).reshape(-1)  # [U*B] rows of k, v
            origin = union if block_pos is None else block_pos.to(q.device).long()[union]
            positions = (origin[:, None] * block_size + offsets).reshape(-1)
            mask = member.repeat_interleave(block_size, dim=1) & (positions[None, :] <= pos[:, None])
            mask &= tokens[None, :] < length
            tokens = tokens.clamp(max=length - 1)
            keys, values = k[g, tokens].to(compute), v[g, tokens].to(compute)
            qg = q[g * group : (g + 1) * group, begin : begin + n].to(compute)  # [G, n, D]
            scores = torch.einsum("gnd,ld->gnl", qg, keys).float() * scale
            weights = torch.softmax(scores.masked_fill(~mask[None], NEG_INF), dim=-1)
            o = torch.einsum("gnl,ld->gnd", weights.to(compute), values)
            out[g * group : (g + 1) * group, begin : begin + n] = o.to(q.dtype)
    return out
