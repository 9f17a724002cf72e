"""Registers the Triton kernels with the dispatcher in kernels/__init__.py (imported only when Triton is)."""

from salachat.kernels import _TRITON
from salachat.kernels.gemv.triton import gemv_triton
from salachat.kernels.lightning.triton import lightning_attention_triton
from salachat.kernels.pointwise.triton import (
    add_rms_norm_triton,
    gated_rms_norm_triton,
    heads_gate_triton,
    norm_rope_triton,
    rms_norm_triton,
    rope_triton,
    silu_mul_triton,
)
from salachat.kernels.sparse.triton_attention import block_sparse_attention_triton
from salachat.kernels.sparse.triton_select import select_blocks_triton

_TRITON.update({
    "gemv": gemv_triton,
    "lightning": lightning_attention_triton,
    "rms_norm": rms_norm_triton,
    "rope": rope_triton,
    "add_rms_norm": add_rms_norm_triton,
    "gated_rms_norm": gated_rms_norm_triton,
    "heads_gate": heads_gate_triton,
    "silu_mul": silu_mul_triton,
    "norm_rope": norm_rope_triton,
    "select_blocks": select_blocks_triton,
    "block_sparse_attention": block_sparse_attention_triton,
})
