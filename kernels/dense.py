"""Dense causal GQA attention with a query offset: the reference (SDPA with a mask) and, on CUDA, two
flash-attention calls that never build the [T, L] mask."""

from __future__ import annotations

import torch
from salachat.kernels import cpu_decode


def dense_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos0: int, scale: float) -> torch.Tensor:
    """Causal GQA softmax attention: q [H, T, D] at positions pos0.. over keys k, v [Hkv, pos0+T, D].

    Key t is visible to query i iff t <= pos0 + i. On CUDA this never builds a [T, L] mask (which at a 1M
    context would be gigabytes per chunk): see `_flash_prefix_and_chunk`.
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_prefix_and_chunk(q, k, v, pos0, scale)
    if k.dtype != q.dtype:  # a 16-bit cache under fp32 activations (packed GGUF models on the CPU)
        low = q.to(k.dtype)
        kernel = q.device.type == "cpu" and cpu_decode.wanted(low, k, v, k.shape[1])
        if k.dtype != torch.float16 or (q.shape[1] == 1 and kernel):
            return _grouped_sdpa(low, k, v, pos0, scale, q.dtype).to(q.dtype)
        # torch's CPU attention in fp16 runs 2-5x slower than in fp32 (no fp16 arithmetic on such a CPU): an
        # fp16 cache is read in fp32 outside the numba decode kernel
        if q.shape[1] > 1 and kernel:
            cpu_decode.prepare(q.shape[0] // k.shape[0], q.shape[-1], k.dtype)  # this reading's decode steps'
        return _grouped_sdpa(q, k.to(q.dtype), v.to(q.dtype), pos0, scale, q.dtype)
    return _grouped_sdpa(q, k, v, pos0, scale, q.dtype)


def _grouped_sdpa(q, k, v, pos0: int, scale: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """SDPA with a KV group's query heads stacked as rows, so K/V are never repeated per head: on the CPU,
    `enable_gqa` copies them for every head and falls back to the unfused math path (measured on 2 cores,
    9 heads over 3: a decode step over 8K keys 31.8 ms against 0.83 ms, a 512-query chunk 382 against 99).
    A decode step's two-halves form returns `out_dtype` (its merge is in fp32), the rest q's dtype."""
    heads, t, d = q.shape
    kv_heads, length = k.shape[0], k.shape[1]
    group = heads // kv_heads
    grouped_q = q.reshape(kv_heads, group * t, d)[None]
    if t == 1:
        if q.device.type == "cpu" and cpu_decode.wanted(q, k, v, length):
            out = cpu_decode.decode_attention(grouped_q[0], k, v, scale)
            if out is not None:
                return out.to(out_dtype or q.dtype).reshape(heads, t, d)
        if q.device.type == "cpu" and _split_keys(kv_heads, length, torch.get_num_threads()):
            return _decode_two_halves(grouped_q[0], k, v, scale).to(out_dtype or q.dtype).reshape(heads, t, d)
        out = torch.nn.functional.scaled_dot_product_attention(grouped_q, k[None], v[None], scale=scale)
        return out[0].reshape(heads, t, d)
    if q.device.type == "cpu" and cpu_decode.wanted(q, k, v, length):  # this reading's decode steps will want it
        cpu_decode.prepare(group, d, k.dtype)
    # a chunk: the cached prefix without a mask, the G query heads of a KV group stacked as rows, and the
    # chunk's own keys causally, merged by their log-sum-exp (as on CUDA). SDPA given the [T, L] mask instead,
    # one query head of each group at a time (all G heads' rows at once built the scores of the whole chunk
    # in fp32: 50 MB for 512 tokens over 8K keys), read the default model's Q8_0 file at 328-348 tokens/s
    # against 374-402 over 8K tokens (2 cores, alternating in one process; 2K as fast either way): past a few
    # thousand tokens the attention is most of a reading's time
    if q.device.type == "cpu":
        return _flash_prefix_and_chunk(q, k, v, pos0, scale, _flash_cpu)
    # elsewhere this is an fp32 model (CUDA's flash attention takes 16 bits only): SDPA under the causal mask
    allowed = torch.arange(length, device=q.device)[None, :] <= torch.arange(pos0, pos0 + t, device=q.device)[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(kv_heads, group, t, d), k[:, None].expand(-1, group, -1, -1), v[:, None].expand(-1, group, -1, -1),
        attn_mask=allowed, scale=scale)
    return out.reshape(heads, t, d)


SPLIT_MIN_KEYS = 768  # below this one flash call is as fast (2 cores, 30 layers' caches: 70 against 78 us at 512 keys)


def _split_keys(kv_heads: int, length: int, threads: int) -> bool:
    """Whether a CPU decode step attends over two halves of the keys at once (see `_decode_two_halves`): when
    the KV heads alone leave threads idle (3 heads on 2 threads: two rounds, one of them half-empty) and
    there are enough keys for halves to be worth it."""
    if threads < 2 or length < SPLIT_MIN_KEYS:
        return False
    rounds = -(-kv_heads // threads)
    return -(-2 * kv_heads // threads) < 2 * rounds


def _decode_two_halves(grouped_q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token's attention, q [Hkv, G, D] over k, v [Hkv, L, D], as ONE CPU flash call over the keys'
    two halves side by side in the batch dimension, merged by their log-sum-exp (in fp32): torch's CPU flash
    attention runs one task per (batch, head), so the default model's 3 KV heads on 2 threads were two rounds
    of full-length tasks and this is three of half-length ones. For odd L the halves are ceil(L/2) keys,
    overlapping in one key, which the second half masks out. Returns fp32 [Hkv, G, D]."""
    kv_heads, length, d = k.shape
    span = (length + 1) // 2
    second = length - span  # the second half's first key
    halves_k = k.as_strided((2, kv_heads, span, d), (second * k.stride(1), k.stride(0), k.stride(1), k.stride(2)))
    halves_v = v.as_strided((2, kv_heads, span, d), (second * v.stride(1), v.stride(0), v.stride(1), v.stride(2)))
    mask = None if 2 * span == length else _overlap_mask(span, grouped_q.dtype, grouped_q.device)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        grouped_q[None].expand(2, -1, -1, -1), halves_k, halves_v, attn_mask=mask, scale=scale)[:2]
    weights = torch.softmax(lse, dim=0)[..., None]  # [2, Hkv, G, 1]: each half's share of the softmax
    return torch.mul(out, weights).sum(0)


_OVERLAP_MASKS: dict[tuple, torch.Tensor] = {}


def _overlap_mask(span: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[2, 1, 1, span]: 0 but for the second half's first key (-inf); a view of one buffer per dtype and
    device, grown by doubling, instead of two small ops every other decode step."""
    buffer = _OVERLAP_MASKS.get((dtype, device))
    if buffer is None or buffer.shape[-1] < span:
        buffer = torch.zeros(2, 1, 1, max(span, 2 * (0 if buffer is None else buffer.shape[-1]), 1024), dtype=dtype,
                             device=device)
        buffer[1, 0, 0, 0] = float("-inf")
        _OVERLAP_MASKS[(dtype, device)] = buffer
    return buffer[..., :span]


def _flash(q, k, v, causal: bool, scale: float):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q[None], k[None], v[None], 0.0, causal, False, scale=scale)[:2]
    return out[0], lse[0]


def _flash_cpu(q, k, v, causal: bool, scale: float):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q[None], k[None], v[None], 0.0, causal,
                                                                          scale=scale)[:2]
    return out[0], lse[0]


def _flash_prefix_and_chunk(q, k, v, pos0: int, scale: float, flash=_flash) -> torch.Tensor:
    """Two flash-attention calls merged by their log-sum-exp: the cached prefix (every key visible, so no
    mask; the G query heads of a KV group are stacked as rows so K/V are never repeated) and the chunk's own
    keys (causal, top-left aligned, which is right for a square block). `flash`: CUDA's or the CPU's."""
    heads, t, d = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    grouped_q = q.reshape(kv_heads, group * t, d)
    if t == 1:  # decode: every cached key is visible, one call with the group's heads as rows
        out, _ = flash(grouped_q, k, v, False, scale)
        return out.reshape(heads, t, d)
    if pos0 == 0:
        o2, _ = flash(q, k.repeat_interleave(group, 0), v.repeat_interleave(group, 0), True, scale)
        return o2
    o1, lse1 = flash(grouped_q, k[:, :pos0], v[:, :pos0], False, scale)
    o1, lse1 = o1.reshape(heads, t, d), lse1.reshape(heads, t)
    chunk_k = k[:, pos0:].repeat_interleave(group, 0)
    chunk_v = v[:, pos0:].repeat_interleave(group, 0)
    o2, lse2 = flash(q, chunk_k, chunk_v, True, scale)
    return merge_by_lse(o1, lse1, o2, lse2).to(q.dtype)


def merge_by_lse(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """One softmax over two key sets from each set's attention output [..., D] and log-sum-exp [...], in fp32
    (a row with no key in a set has lse -inf there)."""
    top = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - top)[..., None], torch.exp(lse2 - top)[..., None]
    return (o1.float() * w1 + o2.float() * w2) / (w1 + w2)
