"""One token's matmul over a packed GGUF layer (the definition): x times the file's weights, in float64; and
the same with x rounded to 8 bits a group of 32 inputs first, as the integer kernel takes it."""

from __future__ import annotations

import torch

GROUP = 32


def packed_gemv_ref(layer, x: torch.Tensor) -> torch.Tensor:
    """x [K] against a `QuantLinear` whose weights are GGUF's dequantisation (`QuantLinear.dequantized`, exact in
    fp32): fp32 [N]."""
    return (layer.dequantized(torch.float32).double() @ x.double()).float()


def quantized_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [K] -> (X int8 [K], s fp32 [K/32]): per group of 32, X = rint(x * (127 / max|x|)) in fp32, s =
    max|x| / 127 (a group of zeros: X = 0, s = 0), so that x ~ s X."""
    groups = x.float().reshape(-1, GROUP)
    amax = groups.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q = torch.round(groups * inv).clamp(-127, 127)  # round half to even, as rint
    return q.to(torch.int8).reshape(-1), (amax / torch.tensor(127.0)).reshape(-1)


def packed_gemv_q8_ref(layer, x: torch.Tensor) -> torch.Tensor:
    """`packed_gemv_ref` for x rounded to 8 bits a group: W (s X), in float64: fp32 [N]."""
    q, s = quantized_activations(x)
    rounded = q.double().reshape(-1, GROUP) * s.double()[:, None]
    return (layer.dequantized(torch.float32).double() @ rounded.reshape(-1)).float()
