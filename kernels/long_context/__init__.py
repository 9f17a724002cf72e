"""Attention past a RoPE model's trained length: the reference (reference.py), its Triton kernel (triton.py)
and its fused CPU form (cpu.py), picked here: Triton on CUDA, the CPU form elsewhere; `impl` ("ref",
"triton", "cpu") or `salachat.kernels.use` forces one."""

from __future__ import annotations

import torch
from salachat.kernels.long_context.cpu import extended_attention_cpu
from salachat.kernels.long_context.reference import (
    add_memory_blocks,
    extended_attention_ref,
    rope_rows,
    select_memory_ref,
)

from salachat import kernels

__all__ = ["add_memory_blocks", "extended_attention", "rope_rows", "select_memory_ref"]


def _triton():
    try:
        from salachat.kernels.long_context.triton import extended_attention_triton
    except ImportError:  # no Triton installed: the reference serves
        return None
    return extended_attention_triton


def extended_attention(q_loc, q_mem, keys, values, memory, row_group, group_start, pos0: int,
                       cos: torch.Tensor, sin: torch.Tensor, block: int, scale: float, impl: str | None = None):
    impl = impl or kernels._FORCED[0]
    fast = None
    if impl == "triton" or (impl is None and q_loc.is_cuda):
        fast = _triton()
        if fast is None and impl == "triton":
            raise NotImplementedError("Triton is not installed")
    if impl == "cpu" or (impl is None and not q_loc.is_cuda):
        fast = extended_attention_cpu
    fn = fast or extended_attention_ref
    return fn(q_loc, q_mem, keys, values, memory, row_group, group_start, pos0, cos, sin, block, scale)
