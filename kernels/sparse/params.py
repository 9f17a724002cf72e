"""Parameters of InfLLM-V2 block selection (MiniCPM-SALA's `sparse_config`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SparseParams:
    block_size: int = 64  # tokens per KV block: the unit of selection
    kernel_size: int = 32  # level-1 compressed keys: mean over this many tokens …
    kernel_stride: int = 16  # … every this many tokens
    init_blocks: int = 1  # always attend to the first blocks (attention sinks)
    local_blocks: int = 32  # window_size // block_size: the blocks before the query's own, always in
    topk: int = 64  # chosen by score; the number selected is topk + local_blocks
    dense_len: int = 8192  # a query at position p with p + 1 < dense_len attends densely

    @property
    def selected(self) -> int:
        return self.topk + self.local_blocks

    @classmethod
    def from_sparse_config(cls, config: dict) -> SparseParams:
        block = int(config.get("block_size", 64))
        return cls(
            block_size=block,
            kernel_size=int(config.get("kernel_size", 32)),
            kernel_stride=int(config.get("kernel_stride", 16)),
            init_blocks=int(config.get("init_blocks", 1)),
            local_blocks=int(config.get("window_size", 2048)) // block,
            topk=int(config.get("topk", 64)),
            dense_len=int(config.get("dense_len", 8192)),
        )
