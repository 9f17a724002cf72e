"""A decoded token's linear layers as one Triton GEMV each (see reference.py for what it computes).

At one row a linear layer reads its weight once and is bound by memory. cuBLAS runs the 9B model's 4096-wide
outputs (o_proj, the output gate, a sparse layer's q/k/v) at ~2.7 TB/s of the H200's ~4.3, and those and the
down projection with a split-K pass and a second kernel that reduces the splits. Here a program owns BN output
rows and walks the whole K, BK columns at a time: one kernel, no split, no partial sums in memory. Over a 9B
token's GEMVs: 4.50 ms against cuBLAS's 4.87 (H200, in CUDA graphs, bench/RESULTS.md)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from salachat.kernels.gemv.reference import gemv_ref


@triton.jit(do_not_specialize=["n", "k"])
def _gemv_kernel(X, W, Y, n, k, s_w, BN: tl.constexpr, BK: tl.constexpr, EVEN: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.arange(0, BK)
    w_ptr = W + rows.to(tl.int64)[:, None] * s_w + cols[None, :]
    acc = tl.zeros((BN, BK), tl.float32)
    for start in range(0, k, BK):
        if EVEN:  # rows and columns are whole tiles: no masks (every shape of the 9B model)
            w = tl.load(w_ptr + start, eviction_policy="evict_first")
            x = tl.load(X + start + cols)
        else:
            ok = (rows[:, None] < n) & (start + cols[None, :] < k)
            w = tl.load(w_ptr + start, mask=ok, other=0.0, eviction_policy="evict_first")
            x = tl.load(X + start + cols, mask=start + cols < k, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, 1)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=rows < n)


_SMS: dict[int, int] = {}


def _tiles(n: int, k: int, device: torch.device) -> tuple[int, int, int]:
    """(rows a program, columns a step, warps), measured on an H200 over the 9B model's shapes in CUDA graphs
    (bench/RESULTS.md): 16 rows on 8 warps while that still makes a program or more per SM (4096 outputs:
    10.4 us against 11.2 with 4 rows), else 4 rows on 4 warps (4608 outputs, 256 programs of 16 rows being 2.2
    waves: 11.6 against 13.3; 32768: 62.7 against 65.1)."""
    if device.type == "cuda" and device.index not in _SMS:
        _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    sms = _SMS.get(device.index, 132)
    bk = 1024 if k >= 1024 else triton.next_power_of_2(k)
    return (16, bk, 8) if n <= 4096 and n // 16 >= sms else (4, bk, 4)


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bn: int | None = None, bk: int | None = None,
                num_warps: int | None = None, num_stages: int = 4) -> torch.Tensor:
    """x [..., K] holding one row, weight [N, K] with unit column stride; the tile settings are for tuning."""
    n, k = weight.shape
    if x.numel() != k or weight.stride(-1) != 1 or x.dtype != weight.dtype:
        return gemv_ref(x, weight)
    tiles = _tiles(n, k, x.device)
    bn, bk, num_warps = bn or tiles[0], bk or tiles[1], num_warps or tiles[2]
    xs = x.reshape(k)
    xs = xs if xs.stride(0) == 1 else xs.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    even = n % bn == 0 and k % bk == 0
    _gemv_kernel[(triton.cdiv(n, bn),)](xs, weight, y, n, k, weight.stride(0), BN=bn, BK=bk, EVEN=even,
                                        num_warps=num_warps, num_stages=num_stages)
    return y
