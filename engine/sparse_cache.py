"""The KV cache of an InfLLM-V2 sparse attention layer: keys and values in blocks, plus compressed keys.

Storage is "sparse computation, dense storage": every token's K and V is kept (the selection needs them),
in a buffer whose capacity is a whole number of `block_size` blocks, so block b is keys[:, bB:(b+1)B].
The level-1 and level-2 compressed keys (means over kernel-sized chunks) are extended as tokens arrive:
a chunk is added once its last token is in, which gives exactly the set a full recomputation gives.

With `resident_blocks` set, only the most recent blocks stay on the device and the rest live in host
memory (engine/kv_offload.py), fetched when selected; the compressed keys always stay on the device (the
selection reads all of them, and they are 16x and 64x smaller). Results are the same either way.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from salachat.engine.cache import grow_tokens, register_cache
from salachat.engine.kv_offload import HEADROOM_BLOCKS, OffloadedKV
from salachat.kernels import (
    SparseParams,
    block_sparse_attention,
    compress_keys,
    dense_attention,
    select_blocks,
)


@register_cache
class SparseKVCache:
    kind: ClassVar[str] = "sparse_kv"

    def __init__(self, n_kv_heads: int, head_dim: int, params: SparseParams, dtype: torch.dtype, device,
                 resident_blocks: int | None = None):
        self.params = params
        empty = torch.empty(n_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.keys, self.values = empty, empty.clone()  # all K/V, when no budget is set
        self.k1, self.k2 = empty.clone(), empty.clone()  # compressed keys, level 1 and level 2
        self._length = self._n1 = self._n2 = 0
        self.offloaded: OffloadedKV | None = None
        if resident_blocks is not None:
            self.offloaded = OffloadedKV(n_kv_heads, head_dim, params.block_size, resident_blocks, dtype, device)

    @property
    def length(self) -> int:
        return self._length

    @property
    def n_blocks(self) -> int:
        return -(-self._length // self.params.block_size)

    @property
    def resident_blocks(self) -> int | None:
        return None if self.offloaded is None else self.offloaded.resident_blocks

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.offloaded is not None:
            return self._append_offloaded(k, v)
        need = self._length + k.shape[1]
        block = self.params.block_size * 16
        self.keys, self.values = grow_tokens(self.keys, need, block), grow_tokens(self.values, need, block)
        self.keys[:, self._length : need] = k
        self.values[:, self._length : need] = v
        self._length = need
        p = self.params
        self.k1, self._n1 = self._extend(self.k1, self._n1, p.kernel_size, p.kernel_stride)
        self.k2, self._n2 = self._extend(self.k2, self._n2, 4 * p.kernel_size, 4 * p.kernel_stride)

    def _append_offloaded(self, k: torch.Tensor, v: torch.Tensor) -> None:
        p = self.params
        # the new compressed chunks start at these tokens: they must still be on the device
        keep_from = min(self._n1 * p.kernel_stride, self._n2 * 4 * p.kernel_stride)
        self.offloaded.append(torch.stack([k, v]), keep_from)
        self._length = self.offloaded.length
        self.k1, self._n1 = self._extend(self.k1, self._n1, p.kernel_size, p.kernel_stride)
        self.k2, self._n2 = self._extend(self.k2, self._n2, 4 * p.kernel_size, 4 * p.kernel_stride)

    def _keys(self, start: int, end: int) -> torch.Tensor:
        if self.offloaded is None:
            return self.keys[:, start:end]
        return self.offloaded.tokens(start, end)[0]

    def _extend(self, compressed: torch.Tensor, count: int, kernel: int, stride: int):
        total = max(0, (self._length - kernel) // stride + 1)
        if total == count:
            return compressed, count
        first = count * stride  # tokens that the new chunks cover
        fresh = compress_keys(self._keys(first, (total - 1) * stride + kernel), kernel, stride)
        compressed = grow_tokens(compressed, total, 256)
        compressed[:, count:total] = fresh
        return compressed, total

    def attend(self, q, k, v, pos0: int, scale: float) -> torch.Tensor:
        """Append k, v; queries at p with p + 1 < dense_len attend densely, the rest through InfLLM-V2."""
        if self.offloaded is not None:
            return self._attend_offloaded(q, k, v, pos0, scale)
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

    def _attend_offloaded(self, q, k, v, pos0: int, scale: float) -> torch.Tensor:
        """As attend, reading K/V through the device tail and, for the blocks selected before it, host memory."""
        self.append(k, v)
        t = q.shape[1]
        n_dense = min(max(self.params.dense_len - 1 - pos0, 0), t)
        parts = []
        if n_dense:
            end = pos0 + n_dense
            kv = self.offloaded.tokens(0, end)  # the dense prefix: fetched if the tail no longer starts at 0
            parts.append(dense_attention(q[:, :n_dense], kv[0], kv[1], pos0, scale))
        if n_dense < t:
            qs, start = q[:, n_dense:], pos0 + n_dense
            idx = select_blocks(qs, self.k1[:, : self._n1], self.k2[:, : self._n2], start, self.params, scale)
            kv, compact_idx, block_pos = self.offloaded.compact(idx)
            parts.append(block_sparse_attention(qs, kv[0], kv[1], compact_idx, start, self.params.block_size,
                                                scale, block_pos=block_pos))
        self.offloaded.trim()
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def set_resident_blocks(self, resident_blocks: int | None) -> None:
        """Change the device budget of a filled cache: move older blocks to host memory, or bring all back."""
        if resident_blocks == self.resident_blocks:
            return
        tensors = self.state()
        keys, values = tensors["keys"], tensors["values"]
        device, empty = self.k1.device, self.k1[:, :0]
        self.keys, self.values, self.offloaded = empty, empty.clone(), None
        if resident_blocks is not None:
            self.offloaded = OffloadedKV(keys.shape[0], keys.shape[2], self.params.block_size, resident_blocks,
                                         keys.dtype, device)
        self._fill(keys, values)

    def _fill(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Make keys, values [Hkv, L, D] (on any device) the contents of this empty cache; a budgeted cache
        takes them a slice at a time, so its device never holds more than a slice beyond the budget."""
        self._length = self._n1 = self._n2 = 0
        self.k1, self.k2 = self.k1[:, :0], self.k2[:, :0]
        device = self.k1.device
        step = keys.shape[1] if self.offloaded is None else self.offloaded.max_tail_blocks * self.params.block_size
        if self.offloaded is not None:
            self.offloaded.reserve(keys.shape[1])
        for begin in range(0, keys.shape[1], max(step, 1)):
            self.append(keys[:, begin : begin + step].to(device), values[:, begin : begin + step].to(device))
        if self.offloaded is not None:
            self.offloaded.trim()

    def state(self) -> dict[str, torch.Tensor]:
        if self.offloaded is not None:  # host memory holds every token: views, no copy
            kv = self.offloaded.host_state()
            return {"keys": kv[0], "values": kv[1], "k1": self.k1[:, : self._n1], "k2": self.k2[:, : self._n2]}
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
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict, resident_blocks: int | None = None,
                   device: torch.device | str | None = None) -> SparseKVCache:
        """The cache saved as `tensors`, `meta`; on `device` (default: where the tensors are), with at most
        about `resident_blocks` blocks there and the rest in host memory when that is set."""
        params = SparseParams(**{k: int(meta[k]) for k in (
            "block_size", "kernel_size", "kernel_stride", "init_blocks", "local_blocks", "topk", "dense_len")})
        keys, values = tensors["keys"], tensors["values"]
        if keys.shape != values.shape or keys.shape[1] != int(meta["length"]):
            raise ValueError(f"sparse KV cache tensors {tuple(keys.shape)}/{tuple(values.shape)} "
                             f"do not match length {meta['length']}")
        cache = cls(keys.shape[0], keys.shape[2], params, keys.dtype, device or keys.device, resident_blocks)
        cache._fill(keys, values)  # recomputes the compressed keys: a check on the saved ones
        for name, mine in (("k1", cache.k1[:, : cache._n1]), ("k2", cache.k2[:, : cache._n2])):
            if name in tensors and not torch.equal(tensors[name].to(mine.device), mine):
                raise ValueError(f"sparse KV cache: saved {name} disagrees with its keys (corrupt state?)")
        return cache

    @classmethod
    def restored(cls, meta: dict, k1: torch.Tensor, k2: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor) -> SparseKVCache:
        """The cache saved with `meta` and compressed keys `k1`, `k2`, around device buffers `keys`, `values`
        [Hkv, >= length, D] that the caller fills before first use (a lazily resumed session streams them in:
        salachat/sessions/lazy.py). The compressed keys are the saved ones, vouched for by their checksums."""
        params = SparseParams(**{k: int(meta[k]) for k in (
            "block_size", "kernel_size", "kernel_stride", "init_blocks", "local_blocks", "topk", "dense_len")})
        cache = cls(keys.shape[0], keys.shape[2], params, keys.dtype, keys.device)
        cache.keys, cache.values, cache._length = keys, values, int(meta["length"])
        cache.k1, cache._n1, cache.k2, cache._n2 = k1, k1.shape[1], k2, k2.shape[1]
        return cache


def default_sparse_params_for(trained_length: int) -> SparseParams:
    """InfLLM-V2 settings for a dense Llama reading past its trained length: MiniCPM-SALA's geometry, with
    the dense part and the local window kept well inside what the model was trained on."""
    block = 64
    dense_len = max(block * 4, min(8192, trained_length // 2))
    window = max(block, min(2048, trained_length // 8))
    return SparseParams(block_size=block, kernel_size=32, kernel_stride=16, init_blocks=1,
                        local_blocks=window // block, topk=64, dense_len=dense_len)


def limit_device_kv(cache, budget_gb: float | None) -> int | None:
    """Keep at most `budget_gb` GB of the sparse layers' K/V on the device (shared evenly by those layers),
    the rest in host memory; None puts it all back on the device. Works on a new or a resumed ModelCache.
    Returns the blocks each layer keeps resident (None: all)."""
    sparse = [layer for layer in cache.layers if isinstance(layer, SparseKVCache)]
    if not sparse:
        return None
    resident = None
    if budget_gb is not None:
        k1 = sparse[0].k1
        block_bytes = 2 * k1.shape[0] * sparse[0].params.block_size * k1.shape[2] * k1.element_size()
        resident = int(budget_gb * 2**30) // (len(sparse) * block_bytes) - HEADROOM_BLOCKS
        if resident < 1:
            least = len(sparse) * block_bytes * (1 + HEADROOM_BLOCKS) / 2**30
            raise ValueError(f"a GPU budget of {budget_gb} GB for the KV cache is below this model's minimum "
                             f"of {least:.3f} GB: give a larger budget")
    for layer in sparse:
        layer.set_resident_blocks(resident)
    return resident
