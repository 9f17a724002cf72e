"""Weight quantisation with bitsandbytes: swap the linear layers (not embeddings, norms or the LM head).

The LM head stays in full precision: it is one matrix, and quantising it moves every logit at once.
int8 is LLM.int8() (Linear8bitLt, outliers above 6.0 kept in 16 bit); nf4 is 4-bit NormalFloat with
blockwise scales (Linear4bit), computing in the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("int8", "nf4")


def _quantised(linear: nn.Linear, mode: str, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    device = linear.weight.device
    weight = linear.weight.data.detach().to("cpu", torch.float16 if compute_dtype != torch.bfloat16 else torch.bfloat16)
    if mode == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                  compute_dtype=compute_dtype, quant_type="nf4", device="cpu")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False,
                                    has_fp16_weights=False, threshold=6.0, device="cpu")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    return layer.to(device)  # moving to a device is what quantises in bitsandbytes


def quantize_linears(model: nn.Module, mode: str, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    if mode not in MODES:
        raise ValueError(f"quantisation {mode!r} is not supported: choose {' or '.join(MODES)}")
    compute_dtype = next(model.parameters()).dtype
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = _quantised(linear, mode, compute_dtype)
        if hasattr(linear, "sizes"):  # a fused projection (SalaForCausalLM.fuse_projections): how to split it
            layer.sizes = linear.sizes
        setattr(parent, child, layer)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes the weights take in memory, quantised ones counted as stored (with their scales)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total
