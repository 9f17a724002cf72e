"""Attention kernels: every op is a PyTorch reference (the definition) plus, where written, a Triton kernel.

The functions here dispatch: Triton on CUDA when a kernel exists, the reference elsewhere; `impl="ref"` or
`impl="triton"` forces one (tests use both). Layout is one sequence, heads-first (see each reference).
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from salachat.kernels.dense import dense_attention_impl
from salachat.kernels.lightning.reference import lightning_attention_ref
from salachat.kernels.pointwise.reference import (
    gated_rms_norm_ref,
    heads_gate_ref,
    norm_rope_ref,
    rms_norm_ref,
    rope_ref,
    silu_mul_ref,
)
from salachat.kernels.sparse.params import SparseParams
from salachat.kernels.sparse.reference import block_sparse_attention_ref, compress_keys_ref, select_blocks_ref

__all__ = [
    "SparseParams", "add_rms_norm", "block_sparse_attention", "compress_keys", "dense_attention",
    "gated_rms_norm", "heads_gate", "lightning_attention", "linear", "norm_rope", "rms_norm", "rope", "select_blocks", "silu_mul",
    "use",
]

_TRITON: dict[str, object] = {}  # op name → Triton implementation, registered by kernels/triton_ops.py
# SALACHAT_KERNELS=ref|triton forces one implementation everywhere (benchmarks, and tests of the whole model
# through the Triton kernels on the CPU under TRITON_INTERPRET=1)
_FORCED: list[str | None] = [os.environ.get("SALACHAT_KERNELS") or None]


@contextlib.contextmanager
def use(impl: str | None):
    """Within the block every op runs `impl` ("ref", "triton", or None for the automatic choice)."""
    before = _FORCED[0]
    _FORCED[0] = impl
    try:
        yield
    finally:
        _FORCED[0] = before


def _pick(op: str, tensor: torch.Tensor, impl: str | None):
    impl = impl or _FORCED[0]
    if impl == "ref":
        return None
    fast = _TRITON.get(op)
    if impl == "triton":
        if fast is None:
            raise NotImplementedError(f"no Triton kernel for {op}")
        return fast
    return fast if (fast is not None and tensor.is_cuda) else None


def lightning_attention(q, k, v, log_decay, scale: float, state=None, impl: str | None = None,
                        update_state: bool = False):
    """(out, new state); with `update_state` the new state may be written over `state` (then returned as is):
    a decoded token saves a copy a layer."""
    fast = _pick("lightning", q, impl)
    if fast is not None:
        return fast(q, k, v, log_decay, scale, state, update_state=update_state)
    return lightning_attention_ref(q, k, v, log_decay, scale, state)


def rms_norm(x, weight, eps: float, impl: str | None = None):
    fast = _pick("rms_norm", x, impl)
    if fast is not None:
        return fast(x, weight, eps)
    if (impl or _FORCED[0]) is None and not x.is_cuda and x.dtype == weight.dtype == torch.float32:
        # in fp32 the reference's rounding step is the identity, and torch's fused kernel gives the same bits
        # (tested) in one pass instead of five: a CPU decode step runs two norms a layer
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    return rms_norm_ref(x, weight, eps)


def add_rms_norm(h, y, scale: float, weight, eps: float, impl: str | None = None):
    """(h + y * scale, rms_norm(h + y * scale)): a residual step and the norm that reads it, in one kernel."""
    fast = _pick("add_rms_norm", h, impl)
    if fast is not None:
        return fast(h, y, scale, weight, eps)
    h = h + y * scale
    return h, rms_norm(h, weight, eps, impl)


def gated_rms_norm(out, weight, eps: float, gate, impl: str | None = None):
    """A Lightning layer's output: out [H, T, D] (fp32) to [T, H * D], RMSNorm, times sigmoid(gate)."""
    fast = _pick("gated_rms_norm", gate, impl)
    return fast(out, weight, eps, gate) if fast is not None else gated_rms_norm_ref(out, weight, eps, gate)


def heads_gate(out, gate, impl: str | None = None):
    """A sparse layer's attention output: out [H, T, D] to [T, H * D], times sigmoid(gate)."""
    fast = _pick("heads_gate", gate, impl)
    return fast(out, gate) if fast is not None else heads_gate_ref(out, gate)


def norm_rope(x, weight, eps: float, cos, sin, impl: str | None = None):
    """x [T, H, D]: each head's RMSNorm, then RoPE; heads-first [H, T, D]."""
    fast = _pick("norm_rope", x, impl)
    if fast is not None:
        return fast(x, weight, eps, cos, sin)
    return rope(rms_norm(x, weight, eps, impl).transpose(0, 1), cos, sin, impl)


def silu_mul(gate_up, impl: str | None = None):
    """silu(gate) * up of a fused gate/up projection [..., 2I]."""
    fast = _pick("silu_mul", gate_up, impl)
    return fast(gate_up) if fast is not None else silu_mul_ref(gate_up)


def rope(x, cos, sin, impl: str | None = None):
    fast = _pick("rope", x, impl)
    return fast(x, cos, sin) if fast is not None else rope_ref(x, cos, sin)


_GEMV_FAILED: list[str] = []  # why the Triton GEMV failed in this process, if it did


def linear(layer, x, impl: str | None = None):
    """layer(x); a decoded token's plain bias-free linear layer (x one row) as one Triton GEMV on CUDA
    (kernels/gemv/triton.py: cuBLAS took 5 % longer over a 9B token's weights, in twice the kernels)."""
    forced = (impl or _FORCED[0]) == "triton"
    if type(layer) is torch.nn.Linear and layer.bias is None and x.numel() == x.shape[-1] \
            and x.dtype == layer.weight.dtype and (forced or not _GEMV_FAILED):
        fast = _pick("gemv", x, impl)
        if fast is not None:
            try:
                return fast(x, layer.weight)
            except Exception as e:
                if forced or isinstance(e, torch.OutOfMemoryError):
                    raise
                # a GPU this Triton cannot build the kernel for still decodes, through cuBLAS; say so once
                _GEMV_FAILED.append(f"{type(e).__name__}: {e}")
                warnings.warn(f"Triton GEMV unavailable ({type(e).__name__}); using cuBLAS", RuntimeWarning,
                              stacklevel=2)
    return layer(x)


def compress_keys(k, kernel: int, stride: int, impl: str | None = None):
    return compress_keys_ref(k, kernel, stride)


def select_blocks(q, k1, k2, q_pos0: int, params: SparseParams, scale: float, impl: str | None = None):
    fast = _pick("select_blocks", q, impl)
    if fast is not None:
        return fast(q, k1, k2, q_pos0, params, scale)
    return select_blocks_ref(q, k1, k2, q_pos0, params, scale)


def block_sparse_attention(q, k, v, idx, q_pos0: int, block_size: int, scale: float, impl: str | None = None,
                           block_pos: torch.Tensor | None = None):
    """block_pos: see block_sparse_attention_ref (KV in a compact buffer of fetched blocks)."""
    fast = _pick("block_sparse_attention", q, impl)
    if fast is not None:
        return fast(q, k, v, idx, q_pos0, block_size, scale, block_pos=block_pos)
    return block_sparse_attention_ref(q, k, v, idx, q_pos0, block_size, scale, block_pos=block_pos)


def dense_attention(q, k, v, q_pos0: int, scale: float, impl: str | None = None):
    return dense_attention_impl(q, k, v, q_pos0, scale)


def _register_triton() -> None:
    """The Triton kernels register themselves in _TRITON; without Triton (or its module) the references serve."""
    import importlib.util

    if importlib.util.find_spec("triton") is not None and importlib.util.find_spec("salachat.kernels.triton_ops") is not None:
        import salachat.kernels.triton_ops  # noqa: F401


_register_triton()
