"""The KV cache of an InfLLM-V2 sparse attention layer: keys and values in blocks, plus compressed keys.

Storage is "sparse computation, dense storage": every token's K and V is kept (the selection needs them),
in a buffer whose capacity is a whole number of `block_size` blocks, so block b is keys[:, bB:(b+1)B].
The level-1 and level-2 compressed keys (means over kernel-sized chunks) are extended as tokens arrive:
a chunk is added once its last token is in, which gives exactly the set a full recomputation gives.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from engine.cache import register_cache
from kernels import SparseParams, block_sparse_attention, compress_keys, dense_attention, select_blocks


def _grow(buffer: torch.Tensor, need: int, step: int) -> torch.Tensor:
    if need <= buffer.shape[1]:
        return buffer
    target = max(need, buffer.shape[1] * 5 // 4)  # geometric: appending to 1M tokens copies O(L) bytes
    capacity = (target + step - 1) // step * step
    grown = buffer.new_empty(buffer.shape[0], capacity, buffer.shape[2])
    grown[:, : buffer.shape[1]] = buffer
    return grown


@register_cache
class SparseKVCache:
    kind: ClassVar[str] = "sparse_kv"

    def __init__(self, n_kv_heads: int, head_dim: int, params: SparseParams, dtype: torch.dtype, device):
        self.params = params
        empty = torch.empty(n_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.keys, self.values = empty, empty.clone()
        self.k1, self.k2 = empty.clone(), empty.clone()  # compressed keys, level 1 and level 2
        self._length = self._n1 = self._n2 = 0

    @property
    def length(self) -> int:
        return self._length

    @property
    def n_blocks(self) -> int:
        return -(-self._length // self.params.block_size)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        need = self._length + k.shape[1]
        block = self.params.block_size * 16
        self.keys, self.values = _grow(self.keys, need, block), _grow(self.values, need, block)
        self.keys[:, self._length : need] = k
        self.values[:, self._length : need] = v
        self._length = need
        p = self.params
        self.k1, self._n1 = self._extend(self.k1, self._n1, p.kernel_size, p.kernel_stride)
        self.k2, self._n2 = self._extend(self.k2, self._n2, 4 * p.kernel_size, 4 * p.kernel_stride)

    def _extend(self, compressed: torch.Tensor, count: int, kernel: int, stride: int):
        total = max(0, (self._length - kernel) // stride + 1)
        if total == count:
            return compressed, count
        first = count * stride  # tokens that the new chunks cover
        fresh = compress_keys(self.keys[:, first : (total - 1) * stride + kernel], kernel, stride)
        compressed = _grow(compressed, total, 256)
        compressed[:, count:total] = fresh
        return compressed, total

    def attend(self, q, k, v, pos0: int, scale: float) -> torch.Tensor:
        """Append k, v; queries at p with p + 1 < dense_len attend densely, the rest through InfLLM-V2."""
        self.append(k, v)
        keys, values = self.keys[:, : self._length], self.values[:, : self._length]
        t = q.shape[1]
        n_dense = min(max(self.params.dense_len - 1 - pos0, 0), t)
        parts = []
        if n_dense:
            end = pos0 + n_dense
            parts.append(dense_attention(q[:, :n_dense], keys[:, :end], values[:, :end], pos0, scale))
        if n_dense < t:
            qs, start = q[:, n_dense:], pos0 + n_dense
            idx = select_blocks(qs, self.k1[:, : self._n1], self.k2[:, : self._n2], start, self.params, scale)
            parts.append(block_sparse_attention(qs, keys, values, idx, start, self.params.block_size, scale))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "keys": self.keys[:, : self._length], "values": self.values[:, : self._length],
            "k1": self.k1[:, : self._n1], "k2": self.k2[:, : self._n2],
        }

    def meta(self) -> dict:
        p = self.params
        return {"length": self._length, "block_size": p.block_size, "kernel_size": p.kernel_size,
                "kernel_stride": p.kernel_stride, "init_blocks": p.init_blocks, "local_blocks": p.local_blocks,
                "topk": p.topk, "dense_len": p.dense_len}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "SparseKVCache":
        params = SparseParams(**{k: int(meta[k]) for k in (
            "block_size", "kernel_size", "kernel_stride", "init_blocks", "local_blocks", "topk", "dense_len")})
        keys, values = tensors["keys"], tensors["values"]
        if keys.shape != values.shape or keys.shape[1] != int(meta["length"]):
            raise ValueError(f"sparse KV cache tensors {tuple(keys.shape)}/{tuple(values.shape)} "
                             f"do not match length {meta['length']}")
        cache = cls(keys.shape[0], keys.shape[2], params, keys.dtype, keys.device)
        cache.append(keys, values)  # recomputes the compressed keys: a check on the saved ones
        for name, mine in (("k1", cache.k1[:, : cache._n1]), ("k2", cache.k2[:, : cache._n2])):
            if name in tensors and not torch.equal(tensors[name], mine):
                raise ValueError(f"sparse KV cache: saved {name} disagrees with its keys (corrupt state?)")
        return cache


def default_sparse_params_for(trained_length: int) -> SparseParams:
    """InfLLM-V2 settings for a dense Llama reading past its trained length: MiniCPM-SALA's geometry, with
    the dense part and the local window kept well inside what the model was trained on."""
    block = 64
    dense_len = max(block * 4, min(8192, trained_length // 2))
    window = max(block, min(2048, trained_length // 8))
    return SparseParams(block_size=block, kernel_size=32, kernel_stride=16, init_blocks=1,
                        local_blocks=window // block, topk=64, dense_len=dense_len)
