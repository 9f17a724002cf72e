"""Attention past a RoPE model's trained length (InfLLM-style positions): the plain-PyTorch definitions.

Keys are kept unrotated. Queries come in groups of `block` consecutive positions (the same aligned spans as
the key blocks); group g attends
- its local span [ls_g, p] at true relative distances: keys rotated by (j - ls_g), the query by (p - ls_g);
- memory blocks (the initial block and the selected ones) as if they sat `memory_distance` away: keys
  unrotated (position 0), the query rotated by `memory_distance`.
Both parts share one softmax. Blocks are chosen in the frame they are attended in: each block's keys at
position 0 against the group's mean query rotated by the memory distance (see select_memory_ref).
"""

from __future__ import annotations

import torch


def select_memory_ref(qbar: torch.Tensor, keys: torch.Tensor, n_before: torch.Tensor, init_blocks: int,
                      topk: int, block: int, scale: float) -> torch.Tensor:
    """Memory blocks of each query group: [Hkv, G, init_blocks + topk] int32, -1 where unused.

    qbar [Hkv, G, per, D]: each group's mean memory-frame query, per query head; keys [Hkv, n*B, D]: the
    unrotated keys of the first n blocks (at position 0: the frame memory is attended in); n_before [G]:
    the blocks that end at or before the group's local span (only those may be memory). A block scores by
    the attention mass its keys would get (the log-sum-exp of its scores) from the query head that wants it
    most, so one retrieval head can claim a block that the others ignore. The initial blocks are always in."""
    hkv, groups = qbar.shape[:2]
    n_blocks = keys.shape[1] // block
    out = torch.full((hkv, groups, init_blocks + topk), -1, dtype=torch.int32, device=qbar.device)
    first = torch.arange(init_blocks, device=qbar.device)
    out[:, :, :init_blocks] = torch.where(first[None, :] < n_before[:, None], first[None, :], -1).int()
    k = min(topk, max(n_blocks - init_blocks, 0))
    if k == 0:
        return out
    keys = keys[:, : n_blocks * block]
    scores = []
    for g0 in range(0, groups, 16):  # bounds the [Hkv, 16, per, L] score tensor at long contexts
        s = torch.einsum("hgpd,hld->hgpl", (qbar[:, g0 : g0 + 16] * scale).to(keys.dtype), keys).float()
        scores.append(s.unflatten(-1, (n_blocks, block)).logsumexp(-1).amax(2))
    scores = torch.cat(scores, dim=1)  # [Hkv, G, n_blocks]
    blocks = torch.arange(n_blocks, device=qbar.device)
    allowed = (blocks[None, :] >= init_blocks) & (blocks[None, :] < n_before[:, None])  # [G, n_blocks]
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    best, idx = scores.topk(k, dim=-1)
    # ascending block order, unused (-1) last: the order keys are read in does not change the result
    idx = torch.where(best > float("-inf"), idx, n_blocks).sort(-1).values
    out[:, :, init_blocks : init_blocks + k] = torch.where(idx >= n_blocks, -1, idx).int()
    return out


def add_memory_blocks(memory: torch.Tensor, blocks: torch.Tensor, n_before: torch.Tensor) -> torch.Tensor:
    """memory [Hkv, G, M] with `blocks` [F] appended to every group's list: [Hkv, G, M + F], -1 where a block
    does not end before the group's local span (n_before [G]) or is in the list already."""
    hkv, groups, _ = memory.shape
    extra = blocks.to(memory)[None, None, :].expand(hkv, groups, -1)
    fresh = ~(memory[..., :, None] == extra[..., None, :]).any(-2)
    ok = (extra < n_before[None, :, None]) & fresh
    return torch.cat([memory, torch.where(ok, extra, -1)], dim=-1)


def memory_kv(keys: torch.Tensor, values: torch.Tensor, blocks: torch.Tensor, block: int):
    """The keys and values of one group's memory blocks (blocks [Hkv, M], -1: none): k, v [Hkv, M*B, D] and
    which of their positions are real [Hkv, M*B]."""
    blocks = blocks.long()
    span = (blocks.clamp(min=0)[:, :, None] * block + torch.arange(block, device=keys.device)).flatten(1)
    kv_idx = torch.arange(keys.shape[0], device=keys.device)[:, None]
    key_ok = (blocks >= 0)[:, :, None].expand(-1, -1, block).flatten(1)
    return keys[kv_idx, span], values[kv_idx, span], key_ok


def rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotate_half RoPE of x [..., T, D] by per-row cos, sin [T, D] (fp32), in x's dtype."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def extended_attention_ref(q_loc: torch.Tensor, q_mem: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           memory: torch.Tensor, row_group: torch.Tensor, group_start: torch.Tensor, pos0: int,
                           cos: torch.Tensor, sin: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """Attention of queries at pos0.. (rows of q_loc/q_mem [H, T, D]) over unrotated keys/values [Hkv, L, D].

    q_loc is rotated by (p - ls) where ls = group_start[row_group[row]], q_mem by the memory distance;
    memory [Hkv, G, M] lists each group's memory blocks (-1: none); cos, sin [P, D] are the model's
    rotary tables for relative positions 0..P-1. Returns [H, T, D] in q's dtype."""
    heads, _, d = q_loc.shape
    hkv = keys.shape[0]
    per = heads // hkv
    out = torch.empty_like(q_loc)
    for g in range(memory.shape[1]):
        rows = (row_group == g).nonzero().flatten()
        if rows.numel() == 0:
            continue
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        ls, end = int(group_start[g]), pos0 + r1
        k_loc = rope_rows(keys[:, ls:end], cos[: end - ls], sin[: end - ls]).float()
        v_loc = values[:, ls:end].float()
        k_mem, v_mem, key_ok = memory_kv(keys, values, memory[:, g], block)
        k_mem, v_mem = k_mem.float(), v_mem.float()
        ql = q_loc[:, r0:r1].float().reshape(hkv, per * (r1 - r0), d)
        qm = q_mem[:, r0:r1].float().reshape(hkv, per * (r1 - r0), d)
        s_loc = ql @ k_loc.transpose(1, 2) * scale
        qpos = (pos0 + torch.arange(r0, r1, device=keys.device)).repeat(per)
        causal = torch.arange(ls, end, device=keys.device)[None, :] <= qpos[:, None]
        s_loc = s_loc.masked_fill(~causal[None], float("-inf"))
        s_mem = (qm @ k_mem.transpose(1, 2) * scale).masked_fill(~key_ok[:, None, :], float("-inf"))
        p = torch.softmax(torch.cat([s_mem, s_loc], dim=-1), dim=-1)
        o = p @ torch.cat([v_mem, v_loc], dim=1)
        out[:, r0:r1] = o.view(heads, r1 - r0, d).to(out.dtype)
    return out
