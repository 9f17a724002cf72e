"""Sparse-layer K/V with only the most recent blocks on the GPU; the rest in (pinned) host memory.

Every token's K and V is written through to a host buffer as it arrives (one non-blocking copy), so the
host always holds the whole cache: evicting a block from the device is free, and `state()` for a session
save is a view of host memory, not a copy. The device keeps a contiguous tail of the most recent blocks
(tokens [tail_start, length), tail_start on a block boundary). InfLLM-V2 knows which blocks a chunk will
read before it reads them (the selection needs only the compressed keys), so `compact()` gathers the
selected blocks that are not on the device from host memory into a pinned staging buffer, copies them up
in one transfer, and returns a compact buffer plus each compact block's original position: the input of
`block_sparse_attention(..., block_pos=...)`.

Layout: K and V share one tensor [2, Hkv, tokens, D] on each side, so one gather and one copy move both.
"""

from __future__ import annotations

import torch

HEADROOM_BLOCKS = 4  # the tail is shifted only when full: at most once per this many blocks of decode


class OffloadedKV:
    HOT_LIMIT_BLOCKS = 512  # fetched blocks kept for the next call: a decode step's selection, not a prefill's
    def __init__(self, n_kv_heads: int, head_dim: int, block_size: int, resident_blocks: int,
                 dtype: torch.dtype, device: torch.device | str):
        if resident_blocks < 1:
            raise ValueError(f"resident_blocks must be at least 1, not {resident_blocks}")
        self.device = torch.device(device)
        self.block_size = block_size
        self.resident_blocks = resident_blocks
        self.pinned = self.device.type == "cuda"  # pinned host memory only means something next to a GPU
        self.host = torch.empty(2, n_kv_heads, 0, head_dim, dtype=dtype, pin_memory=self.pinned)
        self.tail = torch.empty(2, n_kv_heads, self.max_tail_blocks * block_size, head_dim, dtype=dtype,
                                device=self.device)
        self.tail_start = 0
        self.length = 0
        self._staging = torch.empty(0, dtype=dtype, pin_memory=self.pinned)
        self.fetched_blocks = 0  # blocks copied up from host memory so far (benchmarks, tests)
        self.reused_blocks = 0  # host-only blocks found on the device, fetched by the previous call
        self._hot = self.tail[:, :, :0].unflatten(2, (0, block_size))
        self._hot_ids = torch.empty(0, dtype=torch.int64)

    @property
    def max_tail_blocks(self) -> int:
        """The device tail's size between chunks: the budget."""
        return self.resident_blocks + HEADROOM_BLOCKS

    @property
    def device_bytes(self) -> int:
        return (self.tail.numel() + self._hot.numel()) * self.tail.element_size()

    def _host_ready(self) -> None:
        """Non-blocking write-through copies into host memory must land before the CPU reads it."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def append(self, kv: torch.Tensor, keep_from: int) -> None:
        """Append kv [2, Hkv, T, D] (on the device). `keep_from`: the first token the caller still needs on
        the device after this append (for its compressed keys); the most recent blocks always stay."""
        t, b = kv.shape[2], self.block_size
        need = self.length + t
        if need > self.host.shape[2]:
            self._grow_host(need)
        self.host[:, :, self.length : need].copy_(kv, non_blocking=True)
        if need - self.tail_start > self.tail.shape[2]:
            recent = max(0, -(-need // b) - self.resident_blocks) * b
            keep = max(self.tail_start, min(recent, keep_from // b * b, self.length // b * b))
            blocks = max(self.max_tail_blocks, -(-(need - keep) // b))
            self._move_tail(keep, blocks)
        self.tail[:, :, self.length - self.tail_start : need - self.tail_start] = kv
        self.length = need

    def reserve(self, tokens: int) -> None:
        """Size host memory for `tokens` at once (a restored cache): one pinned allocation, not dozens."""
        if tokens > self.host.shape[2]:
            self._grow_host(tokens, exact=True)

    def trim(self) -> None:
        """After a chunk larger than the budget: give the device memory back, keeping the newest blocks."""
        if self.tail.shape[2] > self.max_tail_blocks * self.block_size:
            recent = max(0, -(-self.length // self.block_size) - self.resident_blocks) * self.block_size
            self._move_tail(max(recent, self.tail_start), self.max_tail_blocks)

    def _move_tail(self, start: int, blocks: int) -> None:
        kept = self.tail[:, :, start - self.tail_start : self.length - self.tail_start]
        tail = self.tail.new_empty(*self.tail.shape[:2], blocks * self.block_size, self.tail.shape[3])
        tail[:, :, : kept.shape[2]] = kept
        self.tail, self.tail_start = tail, start

    def _grow_host(self, need: int, exact: bool = False) -> None:
        step = self.block_size * 16
        capacity = -(-(need if exact else max(need, self.host.shape[2] * 5 // 4)) // step) * step
        self._host_ready()  # the old buffer may still be receiving
        host = torch.empty(*self.host.shape[:2], capacity, self.host.shape[3], dtype=self.host.dtype,
                           pin_memory=self.pinned)
        host[:, :, : self.length] = self.host[:, :, : self.length]
        self.host = host

    def tokens(self, start: int, end: int) -> torch.Tensor:
        """[2, Hkv, end - start, D] on the device: a view of the tail, or fetched where it reaches before it."""
        if start >= self.tail_start:
            return self.tail[:, :, start - self.tail_start : end - self.tail_start]
        self._host_ready()
        split = min(end, self.tail_start)
        fetched = self.host[:, :, start:split].to(self.device, non_blocking=True)
        if end <= self.tail_start:
            return fetched
        return torch.cat([fetched, self.tail[:, :, : end - self.tail_start]], dim=2)

    def compact(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The blocks named in idx [Hkv, T, K] (-1 padding), gathered: (kv [2, Hkv, n*B (less the unwritten end
        of the newest block), D], idx renumbered to compact blocks, block_pos [n]). Compact blocks keep the
        ascending order of the original ids, so attention sums in the same order as over the full buffer."""
        b = self.block_size
        union = torch.unique(idx[idx >= 0])  # sorted
        listed = union.cpu()  # the one sync: the host must know what to gather
        first_resident = self.tail_start // b
        n_off = int(torch.searchsorted(listed, first_resident))
        parts = []
        if n_off:
            parts.append(self._offloaded_blocks(listed[:n_off].long()))
        if n_off < union.numel():
            tail_blocks = self.tail.unflatten(2, (self.tail.shape[2] // b, b))
            parts.append(tail_blocks.index_select(2, union[n_off:] - first_resident))
        kv = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)).flatten(2, 3)
        # the newest block may be partly written: cut its unwritten end off (the attention masks by length)
        newest = int(listed[-1]) == (self.length - 1) // b
        length = kv.shape[2] - (-self.length % b if newest else 0)
        renumbered = torch.searchsorted(union, idx, out_int32=idx.dtype == torch.int32)
        compact_idx = torch.where(idx >= 0, renumbered, -1).to(idx.dtype)
        return kv[:, :, :length], compact_idx, union

    def _offloaded_blocks(self, wanted: torch.Tensor) -> torch.Tensor:
        """[2, Hkv, n, B, D] on the device for the host-only blocks `wanted` (sorted, CPU): those the last
        call fetched are still on the device (consecutive decode steps select mostly the same blocks); only
        the others cross the bus, gathered into pinned staging and copied up in one transfer."""
        b, (two, heads, _, d) = self.block_size, self.host.shape
        first, last = int(wanted[0]), int(wanted[-1])
        if len(wanted) > self.HOT_LIMIT_BLOCKS and 2 * len(wanted) >= last - first + 1:
            # a prefill chunk's union covers most of its span: one straight copy of the span (no gather on
            # the CPU, which would be the slow part), then the selection picks the blocks on the GPU
            self._host_ready()
            span = self.tail.new_empty(two, heads, (last - first + 1) * b, d)
            for i in range(two):
                for h in range(heads):  # each (K/V, head) row of the span is contiguous in host memory
                    span[i, h].copy_(self.host[i, h, first * b : (last + 1) * b], non_blocking=True)
            self.fetched_blocks += last - first + 1
            self._hot, self._hot_ids = self.tail[:, :, :0].unflatten(2, (0, b)), wanted[:0]
            return span.unflatten(2, (-1, b)).index_select(2, (wanted - first).to(self.device))
        present = torch.isin(wanted, self._hot_ids)
        missing = wanted[~present]
        out = None if len(missing) == len(wanted) else self.tail.new_empty(two, heads, len(wanted), b, d)
        if len(missing):
            self._host_ready()
            numel = two * heads * len(missing) * b * d
            if self._staging.numel() < numel:
                self._staging = torch.empty(numel * 5 // 4, dtype=self.host.dtype, pin_memory=self.pinned)
            staging = self._staging[:numel].view(two * heads, len(missing), b * d)
            blocks = self.host.view(two * heads, -1, b * d)  # a view: the host buffer holds whole blocks
            torch.index_select(blocks, 1, missing, out=staging)
            # copy=True: on a CPU "device" .to would alias the staging buffer that the next call overwrites
            fresh = staging.view(two, heads, len(missing), b, d).to(self.device, non_blocking=True, copy=True)
            if out is None:
                out = fresh
            else:
                out[:, :, (~present).nonzero().squeeze(1).to(self.device)] = fresh
            self.fetched_blocks += len(missing)
        if bool(present.any()):
            slots = torch.searchsorted(self._hot_ids, wanted[present])
            out[:, :, present.nonzero().squeeze(1).to(self.device)] = self._hot[:, :, slots.to(self.device)]
            self.reused_blocks += int(present.sum())
        # keep what this call needed for the next one, unless it is a prefill chunk's large union
        keep = len(wanted) <= self.HOT_LIMIT_BLOCKS
        self._hot, self._hot_ids = (out, wanted) if keep else (out[:, :, :0], wanted[:0])
        return out

    def host_state(self) -> torch.Tensor:
        """[2, Hkv, length, D]: every token, a view of host memory."""
        self._host_ready()
        return self.host[:, :, : self.length]
