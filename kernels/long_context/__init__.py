"""Attention past a RoPE model's trained length: the reference (reference.py) and its Triton kernel
(triton.py), picked here: Triton on CUDA, the reference elsewhere; `impl` or `salachat.kernels.use` forces one."""

from __future__ import annotations

import torch
from salachat.kernels.long_context.reference import extended_attention_ref, rope_rows, select_memory_ref

from salachat import kernels

__all__ = ["extended_attention", "rope_rows", "select_memory_ref"]


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
    fn = fast or extended_attention_ref
    return fn(q_loc, q_mem, keys, values, memory, row_group, group_start, pos0, cos, sin, block, scale)
