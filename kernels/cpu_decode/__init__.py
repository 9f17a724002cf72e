"""A decode step's attention over the 16-bit (bf16 or fp16) KV cache on the CPU: a numba kernel
(`numba_attention.py`) beside its definition (`reference.py`), for the long contexts where torch's flash
attention is most of a step.

numba is imported, and the kernel compiled (or loaded from numba's cache), only once a reading reaches
MIN_KEYS keys, in a background thread while the prompt is read (`prepare`); the first decode step waits for
it, so which kernel runs never depends on timing. If numba is missing or fails, `decode_attention` returns
None (said once) and the caller keeps torch's path.
"""

from __future__ import annotations

import math
import threading
import warnings
from concurrent.futures import Future

import numpy as np
import torch
from salachat.kernels import cpu_jit

# below this many keys torch's flash call is cheap (a few ms a step for 30 layers) and a reading that short
# should not pay numba's import and load (~0.8 s, ~2 s when numba's cache is cold)
MIN_KEYS = 768

_LOADS: dict[tuple[int, int], Future] = {}
_FAILED: list[str] = []  # why the kernel is unavailable in this process, if it is
_LOCAL = threading.local()  # per calling thread: its scratch for the tasks' partial results


def wanted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int) -> bool:
    """Whether attention over `length` keys of this cache is the kernel's: q, K and V all bf16 or all fp16 on the
    CPU, rows of a multiple of 16 contiguous, enough keys, and the kernel not known to have failed."""
    return (not _FAILED and q.dtype == k.dtype == v.dtype and k.dtype in (torch.bfloat16, torch.float16)
            and k.device.type == "cpu" and length >= MIN_KEYS
            and k.shape[-1] % 16 == 0 and k.stride(-1) == 1 and v.stride(-1) == 1 and q.shape[0] % k.shape[0] == 0)


def prepare(group: int, dim: int, dtype: torch.dtype = torch.bfloat16) -> None:
    """Start loading the kernel for G = `group`, D = `dim` and a cache of `dtype` in the background (once a
    process)."""
    key = (group, dim, dtype == torch.float16)
    if key not in _LOADS and not _FAILED:
        _LOADS[key] = cpu_jit.submit(_load, *key)


def _load(group: int, dim: int, half: bool):
    cpu_jit.import_numba()
    from salachat.kernels.cpu_decode.numba_attention import kernel

    attend = kernel(group, dim, half)
    q, keys, out = np.zeros((1, group, dim), np.uint16), np.zeros((1, 16, dim), np.uint16), np.empty((1, group, dim), np.float32)
    attend(q.ctypes.data, keys.ctypes.data, keys.ctypes.data, 1, (16 * dim, dim, 16 * dim, dim), 16, 1.0, 1,
           np.empty((1, group, dim + 2), np.float32), out.ctypes.data)  # starts numba's thread pool
    return attend


def _kernel(group: int, dim: int, dtype: torch.dtype):
    prepare(group, dim, dtype)
    load = _LOADS.get((group, dim, dtype == torch.float16))
    if load is None:
        return None
    try:
        return load.result()
    except Exception as e:  # numba missing, or it failed to compile: torch's path serves
        if not _FAILED:
            _FAILED.append(f"{type(e).__name__}: {e}")
            warnings.warn(f"numba decode attention unavailable ({type(e).__name__}: {e}); using torch's flash "
                          "attention", RuntimeWarning, stacklevel=3)
        return None


def _partials(tasks: int, group: int, dim: int) -> np.ndarray:
    """The calling thread's scratch for the attention tasks' partial results, fp32 [tasks, G, D + 2]."""
    partial = getattr(_LOCAL, "partial", None)
    if partial is None or partial.shape != (tasks, group, dim + 2):
        partial = _LOCAL.partial = np.empty((tasks, group, dim + 2), np.float32)
    return partial


def splits_for(kv_heads: int, threads: int) -> int:
    """Key ranges per KV head, so that the tasks (heads x ranges) fill every thread in whole rounds."""
    return threads // math.gcd(kv_heads, threads)


def decode_attention(grouped_q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor | None:
    """One token's attention: grouped_q [Hkv, G, D] (a KV group's query heads as rows) over k, v [Hkv, L, D], all
    bf16 or all fp16 (k, v views of the cache: each row contiguous); fp32 [Hkv, G, D], or None where the kernel
    is unavailable."""
    kv_heads, group, dim = grouped_q.shape
    attend = _kernel(group, dim, k.dtype)
    if attend is None:
        return None
    threads = cpu_jit.follow_torch_threads()
    splits = splits_for(kv_heads, threads)
    partial = _partials(kv_heads * splits, group, dim)
    out = torch.empty(kv_heads, group, dim)
    q = grouped_q if grouped_q.is_contiguous() else grouped_q.contiguous()
    assert k.stride(-1) == v.stride(-1) == 1 and k.dtype == v.dtype == q.dtype and k.shape == v.shape
    attend(q.data_ptr(), k.data_ptr(), v.data_ptr(), kv_heads, (k.stride(0), k.stride(1), v.stride(0), v.stride(1)),
           k.shape[1], scale, splits, partial, out.data_ptr())
    return out


_STEPS: dict[tuple[int, int, bool], Future] = {}
_STEP_FAILED: list[str] = []


def prepare_step(group: int, dim: int, dtype: torch.dtype) -> None:
    """Start loading the whole-step kernel (`numba_step.py`) for G = `group`, D = `dim` and a cache of `dtype`
    in the background (once a process)."""
    key = (group, dim, dtype == torch.float16)
    if key not in _STEPS and not _STEP_FAILED:
        _STEPS[key] = cpu_jit.submit(_load_step, *key)


def _load_step(group: int, dim: int, half: bool):
    cpu_jit.import_numba()
    from salachat.engine.qlinear import PACK_BLOCK
    from salachat.kernels.cpu_decode import numba_step
    from salachat.kernels.packed_gemv import numba_gemv_q8

    # the same matmuls as packed_gemv's: integer where the CPU has AVX2
    return numba_step.kernel(group, dim, half, PACK_BLOCK, numba_gemv_q8.available())


def decode_step(table: np.ndarray, x: torch.Tensor, length: int, cos: torch.Tensor, sin_signed: torch.Tensor,
                kv_heads: int, group: int, intermediate: int, eps: float, scale: float, dtype: torch.dtype) -> bool:
    """x fp32 [hidden] (contiguous, updated in place) through every layer of `table` (`numba_step.COLUMNS`, one
    row a layer) for the token at position `length`, each layer's cache holding `length` positions and room for
    one more; cos, sin_signed fp32 [D] contiguous. False (x untouched) where the kernel is unavailable."""
    if _STEP_FAILED:  # said once; the layers serve
        return False
    prepare_step(group, cos.shape[-1], dtype)
    load = _STEPS.get((group, cos.shape[-1], dtype == torch.float16))
    if load is None:
        return False
    try:
        step = load.result()
    except Exception as e:  # numba missing, or it failed to compile: the step's pieces serve one by one
        if not _STEP_FAILED:
            _STEP_FAILED.append(f"{type(e).__name__}: {e}")
            warnings.warn(f"numba decode step unavailable ({type(e).__name__}: {e}); decoding layer by layer",
                          RuntimeWarning, stacklevel=2)
        return False
    threads = cpu_jit.follow_torch_threads()
    splits = splits_for(kv_heads, threads)
    partial = _partials(kv_heads * splits, group, cos.shape[-1])
    step(x.data_ptr(), table, length, cos.data_ptr(), sin_signed.data_ptr(), x.numel(), kv_heads, intermediate,
         eps, scale, splits, partial)
    return True
