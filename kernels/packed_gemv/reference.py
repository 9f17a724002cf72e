"""One token's matmul over a packed GGUF layer (the definition): x times the file's weights, in float64."""

from __future__ import annotations

import torch


def packed_gemv_ref(layer, x: torch.Tensor) -> torch.Tensor:
    """x [K] against a `QuantLinear` whose weights are GGUF's dequantisation (`QuantLinear.dequantized`, exact in
    fp32): fp32 [N]."""
    return (layer.dequantized(torch.float32).double() @ x.double()).float()
