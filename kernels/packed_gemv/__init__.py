"""One token's matmul over GGUF weights kept packed on the CPU: numba kernels beside their definitions
(`reference.py`), reading torch's int4 packs with GGUF's own fp16 numbers.

On an AVX2 CPU the activations are rounded to 8 bits a group of 32 inputs, as llama.cpp's CPU path does, and
the products are integer (`numba_gemv_q8.py`, ~1e-7 from its float64 definition, ~6e-3 from the unrounded
product, 1.4-2x faster than the fp32 kernel); elsewhere the fp32 kernel serves (`numba_gemv.py`, ~5e-7 from
float64). torch's int4 kernel takes bf16 activations, bf16 copies of the scales, and returns bf16 (~4e-3 from
exact), and is slower than either (bench/packed_gemv_ab.py). The answers of the default model are the same
text either way. numba is imported and the
kernels compiled (or loaded from numba's cache) in the background while the prompt is read (`prepare`); the
first step that wants one waits for it. If numba is missing or fails, `matvec` returns None (said once) and
the caller keeps torch's kernel.

A prompt's tokens go through a dense matmul instead, on weights dequantised for the call: `dequantized_t`
makes W^T from the packs by numba (the same bits as torch's element-wise `QuantLinear.dequantized`, 13x faster:
the default model's 120 matrices in 12 ms against 160, where the matmuls of a 512-token chunk take ~135).
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future

import numpy as np
import torch
from salachat.kernels import cpu_jit

KINDS = ("Q4_0", "Q4_1", "Q8_0")
_LOADS: dict[str, Future] = {}
_FAILED: list[str] = []  # why the kernel is unavailable in this process, if it is
_ROUNDED: set[str] = set()  # the kinds whose loaded kernel rounds the activations to 8 bits
_DEQUANTS: dict[tuple[str, torch.dtype], object] = {}  # (kind, dtype) -> its loaded W^T kernel (`dequantized_t`)


def prepare(qtypes) -> None:
    """Start loading the kernels for these GGUF kinds in the background (once a process)."""
    for qtype in qtypes:
        if qtype in KINDS and qtype not in _LOADS and not _FAILED:
            _LOADS[qtype] = cpu_jit.submit(_load, qtype)


def _load(qtype: str):
    cpu_jit.import_numba()
    from salachat.engine.qlinear import PACK_BLOCK, PREFILL_DTYPE
    from salachat.kernels.packed_gemv import numba_gemv, numba_gemv_q8

    # the prompt's dequantisation first: the prompt is read before anything decodes
    dequant = numba_gemv.dequant_kernel(qtype, PACK_BLOCK, PREFILL_DTYPE == torch.bfloat16)
    pack, numbers = np.zeros((PACK_BLOCK, 16), np.uint8), np.zeros((1, PACK_BLOCK, 2), np.uint16)
    out = np.empty((32, PACK_BLOCK), np.float32)
    dequant(*(a.ctypes.data for a in (pack, pack, numbers, out)), 32, PACK_BLOCK)
    _DEQUANTS[qtype, PREFILL_DTYPE] = dequant
    rounded = numba_gemv_q8.available()
    gemv = (numba_gemv_q8 if rounded else numba_gemv).kernel(qtype, PACK_BLOCK)
    pack = np.zeros((64, 16), np.uint8)
    numbers = np.zeros((1, 64, 2 if qtype == "Q4_1" else 1), np.uint16)
    x, y = np.zeros(32, np.float32), np.empty(64, np.float32)
    gemv(*(a.ctypes.data for a in (pack, pack, numbers, x, y)), 32, 64, 0, 0, 0.0)  # starts numba's threads
    if rounded:
        _ROUNDED.add(qtype)
    return gemv


def _kernel(qtype: str):
    prepare((qtype,))
    load = _LOADS.get(qtype)
    if load is None:
        return None
    try:
        return load.result()
    except Exception as e:  # numba missing, or it failed to compile: torch's kernel serves
        if not _FAILED:
            _FAILED.append(f"{type(e).__name__}: {e}")
            warnings.warn(f"numba packed matmul unavailable ({type(e).__name__}: {e}); using torch's int4 kernel",
                          RuntimeWarning, stacklevel=3)
        return None


def _buffers(layer) -> tuple[int, int, int]:
    """The addresses of a layer's packs and GGUF numbers (taken once a layer)."""
    made = layer.__dict__.get("_gemv_buffers")
    if made is None or made[0] is not layer.packed0:
        pack1 = layer.packed1 if layer.n_packs > 1 else layer.packed0
        buffers = (layer.packed0, pack1, layer.gguf_numbers)
        assert all(b.is_contiguous() and b.device.type == "cpu" for b in buffers)
        made = layer.__dict__["_gemv_buffers"] = (layer.packed0, tuple(b.data_ptr() for b in buffers))
    return made[1]


def _loaded(layer) -> bool:
    """Whether this layer's kind has its kernels loaded (without waiting for them)."""
    load = _LOADS.get(layer.qtype)
    return not (_FAILED or load is None or not load.done() or load.exception() is not None
                or layer.packed0.device.type != "cpu")


def rows(layer, index: torch.Tensor) -> torch.Tensor | None:
    """`QuantLinear.rows` (W[index] in fp32, the same bits) by numba once the kernels have loaded (a reading's
    first embedding does not wait for them), or None where it does not serve."""
    if not _loaded(layer):
        return None
    from salachat.engine.qlinear import PACK_BLOCK
    from salachat.kernels.packed_gemv.numba_gemv import ROW_KINDS
    from salachat.kernels.packed_gemv.numba_gemv import rows as kernel

    out = torch.empty(index.numel(), layer.in_features)
    kernel(*_buffers(layer), index.reshape(-1).to(torch.int64).numpy(), out.numpy(), layer.out_features,
           ROW_KINDS.index(layer.qtype), PACK_BLOCK)
    return out


def dequantized_t(layer, dtype: torch.dtype) -> torch.Tensor | None:
    """W^T [in, out], contiguous: `QuantLinear.dequantized(dtype).T`'s values, the same bits, by numba once the
    kernels have loaded (`numba_gemv.dequant_kernel`, for the dtype `prepare` was given), or None where it does
    not serve."""
    if not _loaded(layer) or (layer.qtype, dtype) not in _DEQUANTS:
        return None
    out = torch.empty(layer.in_features, layer.out_features, dtype=dtype)
    cpu_jit.follow_torch_threads()
    _DEQUANTS[layer.qtype, dtype](*_buffers(layer), out.data_ptr(), layer.in_features, layer.out_features)
    return out


def rounds_activations(layer) -> bool:
    """Whether `matvec` rounded this layer's input to 8 bits (known once it has served the layer's kind)."""
    return layer.qtype in _ROUNDED


def matvec(layer, x: torch.Tensor, norm=None, silu_mul: bool = False) -> torch.Tensor | None:
    """x [1, K] (any float dtype) times a `QuantLinear`'s weights: fp32 [1, N] (bias not added), or None where the
    kernel does not serve (a kind it lacks, a GPU tensor, numba unavailable). With `norm` (an RMSNorm: weight
    fp32 [K], eps) the kernel normalises x first; with `silu_mul`, x [1, 2K] holds gate and up and the kernel
    takes silu(gate) * up (`numba_gemv.prologue`, in fp32): a decode step's norms and SiLU without a torch
    call each."""
    width = layer.in_features * (2 if silu_mul else 1)
    if _FAILED or layer.qtype not in KINDS or x.device.type != "cpu" or x.numel() != width:
        return None
    gemv = _kernel(layer.qtype)
    if gemv is None:
        return None
    buffers = _buffers(layer)
    cpu_jit.follow_torch_threads()
    if x.dtype != torch.float32 or not x.is_contiguous():  # each torch call costs microseconds here
        x = x.to(torch.float32).contiguous()
    y = torch.empty(1, layer.out_features)
    if norm is not None:
        weight = norm.weight
        if weight.dtype != torch.float32 or not weight.is_contiguous():
            weight = weight.detach().to(torch.float32).contiguous()
        gemv(*buffers, x.data_ptr(), y.data_ptr(), layer.in_features, layer.out_features, 1, weight.data_ptr(),
             norm.eps)
    else:
        gemv(*buffers, x.data_ptr(), y.data_ptr(), layer.in_features, layer.out_features, 2 if silu_mul else 0, 0,
             0.0)
    return y
