"""GGUF weights kept quantised in memory on the CPU, with matmuls on the packed weights.

torch's CPU int4 weight-only kernel (`_weight_int4pack_mm_for_cpu`, group-wise: w = (q - 8) * scale + zero
for 4-bit q, one scale and zero per group of 32 inputs) holds GGUF's 4-bit kinds exactly up to the scales'
bf16 rounding:

- Q4_0 (w = d (q - 8)): scale d, zero 0;
- Q4_1 (w = d q + m): scale d, zero m + 8 d;
- Q8_0 (w = d q, 8-bit q) as two 4-bit halves, q = 16 hi + lo with hi + 8 and lo in 0..15:
  w = 16 d (hi + 8 - 8) + d (lo - 8) + 8 d: a pack with scale 16 d, zero 0, plus one with scale d, zero 8 d.

Measured on a 2-core AMX CPU (bench/ask_cpu.py has the end-to-end figures): for one token the int4 kernel
reads 5x fewer bytes than fp32 and beats a dense bf16 or fp32 matrix-vector product; for a prompt's
hundreds of tokens a dense bf16 matmul (AMX) on weights dequantised for the call is faster, so prefill
takes that path. torch's int8 kernel (`_weight_int8pack_mm`) has one scale per output row, which GGUF's
per-32 block scales do not fit without requantising, and measured slower than both.
"""

from __future__ import annotations

import torch
from torch import nn

PACKED_TYPES = ("Q4_0", "Q4_1", "Q8_0")
GROUP = 32
PREFILL_ROWS = 16  # from this many tokens on, dequantise once and use a dense bf16 matmul
PACK_ROWS = 1024  # a multiple of the kernel's 64-row blocks
DEQUANT_SLAB = 1 << 18  # fp32 elements a slab of `dequantized` (1 MB)


def unpack_blocks(raw: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF blocks [rows, row_bytes] → (q [rows, cols] int, scale [rows, cols/32], zero [rows, cols/32]) in
    fp32, with w = (q - 8) * scale + zero for 4-bit q (and w = d q, zero unused, for Q8_0's 8-bit q)."""
    rows = raw.shape[0]
    block = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[qtype]
    blocks = raw.reshape(rows, -1, block)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)
    if qtype == "Q8_0":
        q = blocks[..., 2:].contiguous().view(torch.int8).to(torch.int32)
        return q.reshape(rows, -1), d, torch.zeros_like(d)
    nibbles = blocks[..., 2:] if qtype == "Q4_0" else blocks[..., 4:]
    q = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1).to(torch.int32)  # low nibbles are elements 0..15
    if qtype == "Q4_0":
        zero = torch.zeros_like(d)
    else:
        zero = blocks[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1) + 8 * d
    return q.reshape(rows, -1), d, zero


def dequantize_reference(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """The definition, in fp32: what the packed matmul must equal."""
    q, scale, zero = unpack_blocks(raw, qtype)
    rows, cols = q.shape
    g = q.reshape(rows, -1, GROUP).float()
    if qtype == "Q8_0":
        return (g * scale[..., None]).reshape(rows, cols)
    return ((g - 8) * scale[..., None] + zero[..., None]).reshape(rows, cols)


def _affine(q: torch.Tensor, scale_offset: torch.Tensor) -> torch.Tensor:
    """Weights [R, K] in fp32 from 4-bit codes q [R, K] and one (scale, offset) per GROUP inputs and row
    ([K / GROUP, R, 2], the packs' layout): w = q · scale + offset, exactly GGUF's dequantisation."""
    rows, k = q.shape
    scale, offset = scale_offset[..., 0].T[..., None], scale_offset[..., 1].T[..., None]
    return (q.view(rows, k // GROUP, GROUP).float() * scale.float() + offset.float()).reshape(rows, k)


def _scale_offset(rows: torch.Tensor, qtype: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """GGUF blocks [rows, row_bytes] → per pack (4-bit codes [rows, cols], scale, offset [rows, cols/32]) with
    w = q · scale + offset summed over the packs; scale and offset are GGUF's fp16 numbers times a power of
    two, in fp32: Q4_0 d and -8 d, Q4_1 d and m, Q8_0's hi + 8 with 16 d and -128 d, lo with d and 0."""
    block = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[qtype]
    blocks = rows.reshape(rows.shape[0], -1, block)
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
    if qtype == "Q8_0":
        q = blocks[..., 2:].contiguous().view(torch.int8).to(torch.int32).reshape(rows.shape[0], -1)
        hi = torch.div(q, 16, rounding_mode="floor")
        return [(hi + 8, 16 * d, -128 * d), (q - 16 * hi, d, torch.zeros_like(d))]
    nibbles = blocks[..., 2:] if qtype == "Q4_0" else blocks[..., 4:]
    q = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1).to(torch.int32).reshape(rows.shape[0], -1)
    offset = -8 * d if qtype == "Q4_0" else blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
    return [(q, d, offset)]


def _exact_half(x: torch.Tensor) -> torch.Tensor:
    """x in fp16 where that holds it exactly (GGUF's scales are fp16; times 16 or -128 they stay so unless
    they overflow), else in fp32."""
    half = x.half()
    return half.contiguous() if torch.equal(half.float(), x) else x.contiguous()


class QuantLinear(nn.Module):
    """y = x W^T + b with W held as one or two int4 packs.

    Each pack's (scale, offset) are kept in fp16, exactly as GGUF stores them (w = q · scale + offset in fp32
    is the file's dequantisation, for prefill's dense matmul and the LM head's refined rows), and as the
    kernel's bf16 (scale, zero = offset + 8 scale) for decode. Rounding the scales to bf16 everywhere scaled
    whole groups of 32 weights by up to 0.4 % alike: the default model's logits moved by up to 0.69 and its
    answer to the sample question became a copy of the prompt; rounded only in decode, it answers as in
    fp32. (fp32 copies of the exact numbers were 20 % of the default model's memory.)"""

    def __init__(self, in_features: int, out_features: int, packs: list[tuple[torch.Tensor, torch.Tensor]],
                 qtype: str, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        for i, (packed, scale_offset) in enumerate(packs):
            self.register_buffer(f"packed{i}", packed)
            self.register_buffer(f"scale_offset{i}", scale_offset)
            kernel = torch.stack([scale_offset[..., 0].float(), scale_offset[..., 1].float()
                                  + 8 * scale_offset[..., 0].float()], dim=-1)
            self.register_buffer(f"kernel_scales_zeros{i}", kernel.to(torch.bfloat16), persistent=False)
        self.n_packs = len(packs)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @staticmethod
    def fits(info) -> bool:
        """The kernel packs output rows by 64 and inputs by groups of 32."""
        return (info.qtype.name in PACKED_TYPES and len(info.shape) == 2 and info.shape[0] % 64 == 0
                and info.shape[1] % GROUP == 0)

    @classmethod
    def from_gguf(cls, raw: torch.Tensor, info, bias: bool = False) -> QuantLinear:
        """From a GGUF tensor's raw blocks; the bias (if any) is loaded afterwards under `.bias`."""
        qtype = info.qtype.name
        out_features, in_features = info.shape
        n_packs = 2 if qtype == "Q8_0" else 1
        packed = scale_offset = None
        # rows a slice at a time, written into the finished buffers: the kernel's packing wants int32 codes,
        # 8x the bytes of the file's, and slices of a few MB are reused by the allocator where large ones
        # fragmented its heap (the tied 49K-row head of the default model raised the load peak by 178 MiB)
        for begin in range(0, out_features, PACK_ROWS):
            rows = raw[begin : begin + PACK_ROWS]
            rows = rows if isinstance(rows, torch.Tensor) else torch.from_numpy(rows.copy())
            for i, (nibbles, scale, offset) in enumerate(_scale_offset(rows, qtype)):
                part = torch._convert_weight_to_int4pack_for_cpu(nibbles.contiguous(), 1)
                if packed is None:
                    packed = [part.new_empty(out_features, *part.shape[1:]) for _ in range(n_packs)]
                    scale_offset = [scale.new_empty(scale.shape[1], out_features, 2) for _ in range(n_packs)]
                packed[i][begin : begin + part.shape[0]] = part
                scale_offset[i][:, begin : begin + part.shape[0]] = torch.stack([scale.T, offset.T], dim=-1)
        packs = [(packed[i], _exact_half(scale_offset[i])) for i in range(n_packs)]
        b = torch.zeros(out_features) if bias else None
        return cls(in_features, out_features, packs, qtype, b)

    @classmethod
    def concat(cls, layers: list[QuantLinear]) -> QuantLinear | None:
        """One layer computing several layers' outputs side by side (q, k and v; gate and up): one kernel
        call instead of three or two per token, whose fixed cost is most of a small matrix's. None if the
        layers do not share a type and input."""
        first = layers[0]
        if any(l.qtype != first.qtype or l.in_features != first.in_features or l.n_packs != first.n_packs
               or (l.bias is None) != (first.bias is None) for l in layers):
            return None
        packs = [(torch.cat([getattr(l, f"packed{i}") for l in layers]),
                  torch.cat([getattr(l, f"scale_offset{i}") for l in layers], dim=1).contiguous())
                 for i in range(first.n_packs)]
        bias = torch.cat([l.bias.data for l in layers]) if first.bias is not None else None
        return cls(first.in_features, sum(l.out_features for l in layers), packs, first.qtype, bias)

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """W (for prefill's dense matmul), read back from the packs. torch's CPU int4 layout: per block of 64
        output rows, bytes [in_features][32], byte (k, j) holding rows j (low nibble) and j + 32 (high).

        Computed in fp32 a slab of rows at a time, in place, and rounded into the result: the whole matrix in
        fp32 and its temporaries were a prefill's largest transients (3 of 7 MB each for the default model's
        gate/up at every layer of every chunk), and the allocator kept what they left (2.4x faster too)."""
        n, k = self.out_features, self.in_features
        weight = torch.empty(n, k, dtype=dtype)
        slab = max(64, DEQUANT_SLAB // k // 64 * 64)
        work = torch.empty(min(slab, n), k)
        extra = torch.empty_like(work) if self.n_packs > 1 else None
        for begin in range(0, n, slab):
            end = min(n, begin + slab)
            w = work[: end - begin]
            for i in range(self.n_packs):
                blocks = getattr(self, f"packed{i}").view(n // 64, k, 32)[begin // 64 : end // 64]
                scale_offset = getattr(self, f"scale_offset{i}")[:, begin:end]
                part = w if i == 0 else extra[: end - begin]
                rows64 = part.view(-1, 64, k)
                rows64[:, :32].copy_((blocks & 0xF).transpose(1, 2))
                rows64[:, 32:].copy_((blocks >> 4).transpose(1, 2))
                groups = part.view(end - begin, k // GROUP, GROUP)  # w = q · scale + offset, as `_affine`
                groups.mul_(scale_offset[..., 0].T[..., None]).add_(scale_offset[..., 1].T[..., None])
                if i:
                    w.add_(part)
            weight[begin:end].copy_(w)
        return weight

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """W[index] [R, in_features] in fp32, exactly as the file holds it (as `dequantized` reads it)."""
        n, k = self.out_features, self.in_features
        block, j = index // 64, (index % 64)
        shift = ((j >= 32).to(torch.uint8) * 4)[:, None]  # row j + 32 is the high nibble
        weight = None
        for i in range(self.n_packs):
            byte = getattr(self, f"packed{i}").view(n // 64, k, 32)[block, :, j % 32]  # [R, k]: 2 rows a byte
            q = (byte >> shift) & 0xF  # a shift a row: half the time of `where` over both nibbles
            w = _affine(q, getattr(self, f"scale_offset{i}")[:, index])
            weight = w if weight is None else weight + w
        return weight

    def refine_top(self, x: torch.Tensor, y: torch.Tensor, k: int = 64) -> torch.Tensor:
        """y = this layer's output for x [T, in] from the kernel, its k largest entries per row recomputed in
        fp32 from the exact weights and the fp32 input. The kernel takes bf16 activations and returns bf16:
        logits a bf16 step apart (0.03 at 7.5) tie, and which of two near-equal tokens greedy decoding
        picks then hangs on rounding (the sample question's answer did, on a change of attention kernel)."""
        k = min(k, self.out_features)
        top = y.topk(k, dim=-1).indices  # [T, k]
        w = self.rows(top.flatten()).view(*top.shape, self.in_features)
        exact = torch.einsum("tkd,td->tk", w, x.float())
        if self.bias is not None:
            exact = exact + self.bias.float()[top]
        return y.float().scatter(-1, top, exact)

    def _packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for i in range(self.n_packs):
            y = torch._weight_int4pack_mm_for_cpu(x, getattr(self, f"packed{i}"), GROUP,
                                                  getattr(self, f"kernel_scales_zeros{i}"))
            out = y if out is None else out + y
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if x2.shape[0] >= PREFILL_ROWS:
            y = x2 @ self.dequantized().T
        else:
            y = self._packed_mm(x2)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qtype}"


class QuantEmbedding(nn.Module):
    """Token embeddings kept as GGUF blocks; looked-up rows are dequantised (exactly, in fp32). Tied to a
    packed LM head (`tied`), the rows are read from the head's packs, which hold the same tensor exactly:
    one copy of the vocabulary's weights in memory instead of two (29 of the default model's 145 MiB)."""

    def __init__(self, raw, qtype: str, embedding_dim: int, head: QuantLinear | None = None):
        super().__init__()
        if raw is not None and not isinstance(raw, torch.Tensor):
            raw = torch.tensor(raw)
        self.register_buffer("raw", raw)
        self.qtype, self.embedding_dim = qtype, embedding_dim
        self._head = (head,)  # a tuple: the head is the model's module, registered once, under lm_head

    @classmethod
    def tied(cls, head: QuantLinear) -> QuantEmbedding:
        return cls(None, head.qtype, head.in_features, head)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self._head[0].rows(flat) if self.raw is None else dequantize_reference(self.raw[flat], self.qtype)
        return rows.reshape(*ids.shape, self.embedding_dim)
