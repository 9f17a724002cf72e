"""extended_attention_ref's result on the CPU in fused calls: per query group, the local span and the memory
blocks each go through torch's CPU flash attention (the group's query heads stacked as rows, so K/V are
never repeated per head), and the two parts are merged by their log-sum-exp.

The reference builds and softmaxes the whole [heads, rows, memory + span] score matrix of a group in fp32
tensors; this keeps it in the kernel's tiles. Measured on 2 cores with the default model (9 heads over 3,
head dim 64), a 512-token chunk past the trained length: see docs/architecture.md ("Long context").
"""

from __future__ import annotations

import torch
from salachat.kernels.dense import merge_by_lse
from salachat.kernels.long_context.reference import memory_kv, rope_rows

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def extended_attention_cpu(q_loc: torch.Tensor, q_mem: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           memory: torch.Tensor, row_group: torch.Tensor, group_start: torch.Tensor, pos0: int,
                           cos: torch.Tensor, sin: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """Same arguments and result as extended_attention_ref (rows of a group are consecutive)."""
    heads, _, d = q_loc.shape
    hkv = keys.shape[0]
    per = heads // hkv
    dtype = q_loc.dtype
    out = torch.empty_like(q_loc)
    counts = torch.bincount(row_group, minlength=memory.shape[1]).tolist()
    r0 = 0
    for g, n in enumerate(counts):
        if n == 0:
            continue
        r1 = r0 + n
        ls, end = int(group_start[g]), pos0 + r1
        k_loc = rope_rows(keys[:, ls:end], cos[: end - ls], sin[: end - ls]).to(dtype)
        v_loc = values[:, ls:end].to(dtype)
        # row (head, i) at position pos0 + r0 + i sees local key j iff ls + j <= pos0 + r0 + i
        visible = torch.arange(ls, end, device=keys.device)[None, :] <= (pos0 + r0 + torch.arange(n))[:, None]
        local_mask = torch.zeros(n, end - ls, dtype=dtype).masked_fill_(~visible, float("-inf")).repeat(per, 1)
        ql = q_loc[:, r0:r1].reshape(hkv, per * n, d)[None]
        o, lse = _flash(ql, k_loc[None], v_loc[None], 0.0, False, attn_mask=local_mask, scale=scale)
        o, lse = o[0], lse[0]  # [Hkv, per*n, d], [Hkv, per*n]
        valid = memory[:, g] >= 0  # [Hkv, M]
        if bool(valid.any()):
            k_mem, v_mem, key_ok = memory_kv(keys, values, memory[:, g], block)
            mem_mask = torch.zeros(hkv, 1, key_ok.shape[1], dtype=dtype).masked_fill_(~key_ok[:, None], float("-inf"))
            qm = q_mem[:, r0:r1].reshape(hkv, per * n, d)[None]
            om, lsem = _flash(qm, k_mem.to(dtype)[None], v_mem.to(dtype)[None], 0.0, False,
                              attn_mask=mem_mask[None], scale=scale)
            # a head with no valid memory key: the kernel reports lse 0 and output 0 for it, not -inf
            o = merge_by_lse(o, lse, om[0], lsem[0].masked_fill(~valid.any(1)[:, None], float("-inf")))
        out[:, r0:r1] = o.reshape(heads, n, d).to(out.dtype)
        r0 = r1
    return out
