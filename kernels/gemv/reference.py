"""One token's linear layer, y = x W^T, as the definition of the GEMV kernel: products and sums in fp32, the
result rounded once to the activation dtype (what cuBLAS computes too, in another order of summation)."""

from __future__ import annotations

import torch


def gemv_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] with one row in all, weight [N, K]: [..., N] in x's dtype."""
    return (x.float() @ weight.float().T).to(x.dtype)
