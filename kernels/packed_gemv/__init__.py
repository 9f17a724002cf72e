"""One token's matmul over GGUF weights kept packed on the CPU: a numba kernel (`numba_gemv.py`) beside its
definition (`reference.py`), reading torch's int4 packs with GGUF's own fp16 numbers, in fp32.

torch's int4 kernel takes bf16 activations, bf16 copies of the scales, and returns bf16 (~4e-3 from exact);
this one takes fp32 and is ~5e-7 from float64, and faster (bench/packed_gemv_ab.py). numba is imported and the
kernels compiled (or loaded from numba's cache) in the background while the prompt is read (`prepare`); the
first step that wants one waits for it. If numba is missing or fails, `matvec` returns None (said once) and
the caller keeps torch's kernel.
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


def prepare(qtypes) -> None:
    """Start loading the kernels for these GGUF kinds in the background (once a process)."""
    for qtype in qtypes:
        if qtype in KINDS and qtype not in _LOADS and not _FAILED:
            _LOADS[qtype] = cpu_jit.submit(_load, qtype)


def _load(qtype: str):
    cpu_jit.import_numba()
    from salachat.engine.qlinear import PACK_BLOCK
    from salachat.kernels.packed_gemv.numba_gemv import kernel

    gemv = kernel(qtype, PACK_BLOCK)
    pack = np.zeros((64, 16), np.uint8)
    numbers = np.zeros((1, 64, 2 if qtype == "Q4_1" else 1), np.uint16)
    gemv(pack, pack, numbers, np.zeros(32, np.float32), np.empty(64, np.float32))  # starts numba's threads
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


def matvec(layer, x: torch.Tensor) -> torch.Tensor | None:
    """x [1, K] (any float dtype) times a `QuantLinear`'s weights: fp32 [1, N] (bias not added), or None where the
    kernel does not serve (a kind it lacks, a GPU tensor, numba unavailable)."""
    if _FAILED or layer.qtype not in KINDS or x.device.type != "cpu" or x.numel() != layer.in_features:
        return None
    gemv = _kernel(layer.qtype)
    if gemv is None:
        return None
    made = layer.__dict__.get("_gemv_arrays")
    if made is None or made[0] != layer.packed0.data_ptr():  # numpy views of the layer's buffers, made once
        pack0 = layer.packed0.numpy()
        pack1 = layer.packed1.numpy() if layer.n_packs > 1 else pack0
        made = layer.__dict__["_gemv_arrays"] = (layer.packed0.data_ptr(), (
            pack0, pack1, layer.gguf_numbers.view(torch.int16).numpy().view(np.uint16)))
    arrays = made[1]
    cpu_jit.follow_torch_threads()
    y = torch.empty(1, layer.out_features)
    gemv(*arrays, x.reshape(-1).to(torch.float32).contiguous().numpy(), y.numpy()[0])
    return y
