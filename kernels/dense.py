"""Dense causal GQA attention with a query offset: the reference (SDPA with a mask) and, on CUDA, two
flash-attention calls that never build the [T, L] mask."""

from __future__ import annotations

import torch


def dense_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos0: int, scale: float) -> torch.Tensor:
    """Causal GQA softmax attention: q [H, T, D] at positions pos0.. over keys k, v [Hkv, pos0+T, D].

    Key t is visible to query i iff t <= pos0 + i. On CUDA this never builds a [T, L] mask (which at a 1M
    context would be gigabytes per chunk): see `_flash_prefix_and_chunk`.
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_prefix_and_chunk(q, k, v, pos0, scale)
    t, length = q.shape[1], k.shape[1]
    mask = None
    if t > 1:
        query_pos = torch.arange(pos0, pos0 + t, device=q.device)[:, None]
        mask = torch.arange(length, device=q.device)[None, :] <= query_pos
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[0] != k.shape[0]
    )


def _flash(q, k, v, causal: bool, scale: float):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q[None], k[None], v[None], 0.0, causal, False, scale=scale)[:2]
    return out[0], lse[0]


def _flash_prefix_and_chunk(q, k, v, pos0: int, scale: float) -> torch.Tensor:
    """Two flash-attention calls merged by their log-sum-exp: the cached prefix (every key visible, so no
    mask; the G query heads of a KV group are stacked as rows so K/V are never repeated) and the chunk's own
    keys (causal, top-left aligned, which is right for a square block)."""
    heads, t, d = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    grouped_q = q.reshape(kv_heads, group * t, d)
    if t == 1:  # decode: every cached key is visible, one call with the group's heads as rows
        out, _ = _flash(grouped_q, k, v, False, scale)
        return out.reshape(heads, t, d)
    if pos0 == 0:
        o2, _ = _flash(q, k.repeat_interleave(group, 0), v.repeat_interleave(group, 0), True, scale)
        return o2
    o1, lse1 = _flash(grouped_q, k[:, :pos0], v[:, :pos0], False, scale)
    o1, lse1 = o1.reshape(heads, t, d), lse1.reshape(heads, t)
    chunk_k = k[:, pos0:].repeat_interleave(group, 0)
    chunk_v = v[:, pos0:].repeat_interleave(group, 0)
    o2, lse2 = _flash(q, chunk_k, chunk_v, True, scale)
    top = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - top)[..., None], torch.exp(lse2 - top)[..., None]
    return ((o1.float() * w1 + o2.float() * w2) / (w1 + w2)).to(q.dtype)
