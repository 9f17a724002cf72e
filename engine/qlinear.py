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
hundreds of tokens a dense matmul on weights dequantised for the call is faster, so prefill takes that path
(in bf16 on AMX, in fp32 where the CPU has no bf16 arithmetic: PREFILL_DTYPE). torch's int8 kernel
(`_weight_int8pack_mm`) has one scale per output row, which GGUF's per-32 block scales do not fit without
requantising, and measured slower than both.
"""

from __future__ import annotations

import math

import torch
from salachat.kernels import packed_gemv
from torch import nn

PACKED_TYPES = ("Q4_0", "Q4_1", "Q8_0")
GROUP = 32
PREFILL_ROWS = 16  # from this many tokens on, dequantise once and use a dense matmul (PREFILL_DTYPE)
PACK_ROWS = 256  # a multiple of the kernel's 64-row blocks (1024: the default model's load peak 21 MiB higher)
DEQUANT_SLAB = 1 << 18  # fp32 elements a slab of `dequantized` (1 MB)


def packed_bytes(q: torch.Tensor, block: int) -> torch.Tensor:
    """4-bit codes [N, K] as torch's CPU int4 packs [N, K/2] with `block` output rows a block: per block, bytes
    [K][block / 2], byte (k, j) holding rows j (low nibble) and j + block / 2 (high)."""
    n, k = q.shape
    b = q.reshape(n // block, 2, block // 2, k).to(torch.uint8)
    return (b[:, 0] | (b[:, 1] << 4)).transpose(1, 2).reshape(n, k // 2)


def _torch_pack_block() -> int | None:
    """The output rows of a block of torch's int4 packs on this CPU, or None for a layout we do not read.
    torch picks its packing by the instruction set it finds at run time (64 rows with AVX-512, 32 with AVX2),
    and everything that reads the packs besides its kernel (`dequantized`, `rows`, the numba kernel) must walk
    the same one: reading AVX-512's on an AVX2 machine gave the default model noise for every answer."""
    q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    for block in (64, 32):
        if packed.shape == (128, 32) and torch.equal(packed, packed_bytes(q, block)):
            return block
    return None


PACK_BLOCK = _torch_pack_block()


def _cpu_computes_bf16() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN's check: fp32, right everywhere
        return False


# A prompt's matmul in bf16 where the CPU has bf16 arithmetic (AVX-512 BF16, AMX: oneDNN's bf16 kernels), else
# in fp32: on an AVX2 CPU torch's bf16 matmul is emulated, 8x slower than fp32 (512x576 by 576x1536 on 2 cores:
# 136 against 17 ms), and the default model read 27.5 tokens/s.
PREFILL_DTYPE = torch.bfloat16 if _cpu_computes_bf16() else torch.float32
# A packed model's K/V on the CPU: 16 bits, half of fp32's memory and of the bytes a decoded token reads. bf16
# where the CPU computes in it (the prompt's attention runs in bf16), else fp16 (llama.cpp's default), whose
# 8x finer rounding costs nothing there: with K/V rounded to bf16 and the prompt read in fp32 the default model
# answered the sample question with a copy of the document, as the fp32 network does not.
KV_DTYPE = torch.bfloat16 if PREFILL_DTYPE == torch.bfloat16 else torch.float16


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


def _affine(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Weights [R, K] in fp32 from 4-bit codes q [R, K] and one scale and offset per GROUP inputs and row
    ([K / GROUP, R], the packs' layout): w = q · scale + offset, exactly GGUF's dequantisation."""
    rows, k = q.shape
    return (q.view(rows, k // GROUP, GROUP).float() * scale.T[..., None] + offset.T[..., None]).reshape(rows, k)


# GGUF's own fp16 numbers a group (Q4_0 and Q8_0: d; Q4_1: d, m), and per pack the powers of two that make
# them the pack's (scale, offset) with w = q · scale + offset (None: Q4_1's m): Q4_0 (d, -8 d), Q4_1 (d, m),
# Q8_0's hi + 8 (16 d, -128 d) and lo (d, 0)
GGUF_NUMBERS = {"Q4_0": 1, "Q4_1": 2, "Q8_0": 1}
PACK_FACTORS = {"Q4_0": ((1, -8),), "Q4_1": ((1, None),), "Q8_0": ((16, -128), (1, 0))}


def pack_scale_offset(numbers: torch.Tensor, qtype: str, pack: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A pack's (scale, offset) in fp32 from GGUF's numbers [..., GGUF_NUMBERS[qtype]] in fp16: powers of two
    times fp16 numbers, exact in fp32 (in fp16 16 d or -128 d can overflow)."""
    scale_factor, offset_factor = PACK_FACTORS[qtype][pack]
    d = numbers[..., 0].float()
    scale = d if scale_factor == 1 else scale_factor * d
    if offset_factor is None:
        return scale, numbers[..., 1].float()
    return scale, (offset_factor * d if offset_factor else torch.zeros_like(d))


def _codes(rows: torch.Tensor, qtype: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """GGUF blocks [rows, row_bytes] → each pack's 4-bit codes [rows, cols] (int32) and GGUF's fp16 numbers
    [rows, cols/32, GGUF_NUMBERS[qtype]]; w = q · scale + offset summed over the packs (`pack_scale_offset`)."""
    block = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[qtype]
    blocks = rows.reshape(rows.shape[0], -1, block)
    numbers = blocks[..., : 2 * GGUF_NUMBERS[qtype]].contiguous().view(torch.float16)
    if qtype == "Q8_0":
        q = blocks[..., 2:].contiguous().view(torch.int8).to(torch.int32).reshape(rows.shape[0], -1)
        hi = torch.div(q, 16, rounding_mode="floor")
        return [hi + 8, q - 16 * hi], numbers
    nibbles = blocks[..., 2:] if qtype == "Q4_0" else blocks[..., 4:]
    q = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1).to(torch.int32).reshape(rows.shape[0], -1)
    return [q], numbers


class Arena:
    """Tensors carved out of one allocation made to measure. A model's packed layers built one by one sat in
    glibc's heap between the transients that built them; what those left behind was ~75 MiB of holes that a
    prefill's own transients wandered through and made resident again. One block is mapped on its own, and
    the transients' memory is given back whole."""

    ALIGN = 64

    def __init__(self, nbytes: int):
        self.block = torch.empty(nbytes, dtype=torch.uint8)
        self.used = 0

    @classmethod
    def nbytes(cls, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return -(-math.prod(shape) * dtype.itemsize // cls.ALIGN) * cls.ALIGN

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        size = math.prod(shape) * dtype.itemsize
        if self.used + size > self.block.numel():
            raise ValueError(f"arena of {self.block.numel()} bytes has no room for {size} more")
        view = self.block[self.used : self.used + size].view(dtype).view(shape)
        self.used += self.nbytes(shape, dtype)
        return view


class QuantLinear(nn.Module):
    """y = x W^T + b with W held as one or two int4 packs.

    GGUF's own fp16 numbers are kept as the file has them (`gguf_numbers`: w = q · scale + offset in fp32,
    the packs' (scale, offset) from them by `pack_scale_offset`, is the file's dequantisation, for prefill's
    dense matmul and the LM head's refined rows), and torch's kernel's bf16 (scale, zero = offset + 8 scale),
    made when that kernel first runs (`_kernel_scales`). Rounding the scales to bf16 everywhere scaled whole
    groups of 32 weights by up to 0.4 % alike: the default model's logits moved by up to 0.69 and its answer to
    the sample question became a copy of the prompt; rounded only in that kernel, it answers as in fp32. (fp32
    copies of the exact numbers were 20 % of the default model's memory; each pack's fp16 (scale, offset), 4
    numbers a group of Q8_0 where the file has one, 5 MiB of the default model's 117.)

    Built empty (from an `Arena`, or not) and filled by `load_rows`, a GGUF tensor's rows at a time: several
    tensors of one input side by side (q, k and v; gate and up) make one layer, one kernel call instead of
    three or two per token, whose fixed cost is most of a small matrix's."""

    def __init__(self, in_features: int, out_features: int, qtype: str, bias: torch.Tensor | None = None,
                 arena: Arena | None = None):
        super().__init__()
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        self.n_packs = len(PACK_FACTORS[qtype])
        for name, (shape, dtype) in self.buffer_shapes(in_features, out_features, qtype).items():
            buffer = arena.empty(shape, dtype) if arena is not None else torch.empty(shape, dtype=dtype)
            self.register_buffer(name, buffer)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @staticmethod
    def buffer_shapes(in_features: int, out_features: int, qtype: str) -> dict[str, tuple[tuple, torch.dtype]]:
        groups = in_features // GROUP
        shapes = {"gguf_numbers": ((groups, out_features, GGUF_NUMBERS[qtype]), torch.float16)}
        for i in range(len(PACK_FACTORS[qtype])):
            shapes[f"packed{i}"] = ((out_features, in_features // 2), torch.uint8)
        return shapes

    @classmethod
    def arena_bytes(cls, in_features: int, out_features: int, qtype: str) -> int:
        """What the layer's buffers take in an `Arena`."""
        return sum(Arena.nbytes(shape, dtype) for shape, dtype in cls.buffer_shapes(in_features, out_features,
                                                                                     qtype).values())

    @staticmethod
    def fits(info) -> bool:
        """The kernel packs output rows by 64 and inputs by groups of 32."""
        return (PACK_BLOCK is not None and info.qtype.name in PACKED_TYPES and len(info.shape) == 2
                and info.shape[0] % 64 == 0 and info.shape[1] % GROUP == 0)

    @classmethod
    def from_gguf(cls, raw: torch.Tensor, info, bias: bool = False, arena: Arena | None = None) -> QuantLinear:
        """From a GGUF tensor's raw blocks; the bias (if any) is loaded afterwards under `.bias`."""
        out_features, in_features = info.shape
        layer = cls(in_features, out_features, info.qtype.name, torch.zeros(out_features) if bias else None, arena)
        layer.load_rows(0, raw)
        return layer

    def load_rows(self, begin: int, raw) -> None:
        """Output rows begin.. from a GGUF tensor's raw blocks [rows, row_bytes] (a multiple of 64 rows).

        A slice of rows at a time, written into the layer's buffers: the codes are int32, 8x the bytes of the
        file's, and slices of under a MB are reused by the allocator where large ones
        fragmented its heap (the tied 49K-row head of the default model raised the load peak by 178 MiB)."""
        if begin % 64 or raw.shape[0] % 64 or begin + raw.shape[0] > self.out_features:
            raise ValueError(f"rows {begin}..{begin + raw.shape[0]} do not fit {self.out_features} in blocks of 64")
        for first in range(0, raw.shape[0], PACK_ROWS):
            rows = raw[first : first + PACK_ROWS]
            rows = rows if isinstance(rows, torch.Tensor) else torch.from_numpy(rows.copy())
            at = slice(begin + first, begin + first + rows.shape[0])
            codes, numbers = _codes(rows, self.qtype)
            self.gguf_numbers[:, at] = numbers.transpose(0, 1)
            for i, q in enumerate(codes):
                getattr(self, f"packed{i}")[at] = packed_bytes(q, PACK_BLOCK)  # torch's own packing, checked
        self.__dict__.pop("_kernel_scales_made", None)

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """W (for prefill's dense matmul), read back from the packs (`packed_bytes`' layout, PACK_BLOCK rows a
        block).

        Computed in fp32 a slab of rows at a time, in place, and rounded into the result: the whole matrix in
        fp32 and its temporaries were a prefill's largest transients (3 of 7 MB each for the default model's
        gate/up at every layer of every chunk), and the allocator kept what they left (2.4x faster too)."""
        n, k = self.out_features, self.in_features
        weight = torch.empty(n, k, dtype=dtype)
        slab = max(64, DEQUANT_SLAB // k // 64 * 64)
        work = torch.empty(min(slab, n), k)
        extra = torch.empty_like(work) if self.n_packs > 1 else None
        half = PACK_BLOCK // 2
        for begin in range(0, n, slab):
            end = min(n, begin + slab)
            w = work[: end - begin]
            for i in range(self.n_packs):
                blocks = getattr(self, f"packed{i}").view(n // PACK_BLOCK, k, half)
                blocks = blocks[begin // PACK_BLOCK : end // PACK_BLOCK]
                scale, offset = pack_scale_offset(self.gguf_numbers[:, begin:end], self.qtype, i)
                part = w if i == 0 else extra[: end - begin]
                block_rows = part.view(-1, PACK_BLOCK, k)
                block_rows[:, :half].copy_((blocks & 0xF).transpose(1, 2))
                block_rows[:, half:].copy_((blocks >> 4).transpose(1, 2))
                groups = part.view(end - begin, k // GROUP, GROUP)  # w = q · scale + offset, as `_affine`
                groups.mul_(scale.T[..., None]).add_(offset.T[..., None])
                if i:
                    w.add_(part)
            weight[begin:end].copy_(w)
        return weight

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """W[index] [R, in_features] in fp32, exactly as the file holds it (as `dequantized` reads it); by numba
        where it serves (`packed_gemv.rows`, the same bits: a decode step's embedding and LM head refinement
        took 0.1 and 0.5 ms here)."""
        fast = packed_gemv.rows(self, index)
        if fast is not None:
            return fast
        n, k = self.out_features, self.in_features
        half = PACK_BLOCK // 2
        block, j = index // PACK_BLOCK, (index % PACK_BLOCK)
        shift = ((j >= half).to(torch.uint8) * 4)[:, None]  # row j + half is the high nibble
        weight = None
        for i in range(self.n_packs):
            byte = getattr(self, f"packed{i}").view(n // PACK_BLOCK, k, half)[block, :, j % half]  # 2 rows a byte
            q = (byte >> shift) & 0xF  # a shift a row: half the time of `where` over both nibbles
            w = _affine(q, *pack_scale_offset(self.gguf_numbers[:, index], self.qtype, i))
            weight = w if weight is None else weight + w
        return weight

    def refine_top(self, x: torch.Tensor, y: torch.Tensor, k: int = 64) -> torch.Tensor:
        """y = this layer's output for x [T, in] from the kernel, its k largest entries per row recomputed in
        fp32 from the exact weights and the fp32 input. torch's kernel takes bf16 activations and returns bf16,
        the integer kernel rounds the activations to 8 bits: logits a rounding apart (0.03 at 7.5 in bf16) tie,
        and which of two near-equal tokens greedy decoding picks then hangs on rounding (the sample
        question's answer did, on a change of attention kernel)."""
        k = min(k, self.out_features)
        top = y.topk(k, dim=-1).indices  # [T, k]
        w = self.rows(top.flatten()).view(*top.shape, self.in_features)
        exact = torch.einsum("tkd,td->tk", w, x.float())
        if self.bias is not None:
            exact = exact + self.bias.float()[top]
        return y.float().scatter(-1, top, exact)

    def _kernel_scales(self) -> list[torch.Tensor]:
        """torch's int4 kernel's bf16 (scale, zero) [K/32, N, 2] per pack, made from GGUF's numbers when that
        kernel first runs: where numba serves it never does, and the copies were 19 MiB of the default model's
        111 (a fifth more than the file)."""
        made = self.__dict__.get("_kernel_scales_made")
        if made is None:
            made = []
            for i in range(self.n_packs):
                scale, offset = pack_scale_offset(self.gguf_numbers, self.qtype, i)
                made.append(torch.stack([scale, offset + 8 * scale], dim=-1).to(torch.bfloat16))
            self.__dict__["_kernel_scales_made"] = made
        return made

    def _packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for pack, scales in zip((getattr(self, f"packed{i}") for i in range(self.n_packs)), self._kernel_scales()):
            y = torch._weight_int4pack_mm_for_cpu(x, pack, GROUP, scales)
            out = y if out is None else out + y
        return out

    def one_row(self, x: torch.Tensor, norm=None, silu_mul: bool = False) -> torch.Tensor:
        """x [1, in] (fp32 or bf16) times W, without the bias: fp32 from a numba kernel (exact weights; the input
        rounded to 8 bits a group on an AVX2 CPU, else fp32) where one serves, else bf16 from torch's int4
        kernel. `norm` (an RMSNorm) normalises x first; with `silu_mul` x [1, 2 in] holds gate and up, and
        silu(gate) * up is multiplied (`packed_gemv.matvec`: inside the kernel where it serves)."""
        y = packed_gemv.matvec(self, x, norm=norm, silu_mul=silu_mul)
        if y is not None:
            return y
        if norm is not None:
            x = norm(x)
        if silu_mul:
            gate, up = x.chunk(2, dim=-1)
            x = torch.nn.functional.silu(gate.float()) * up  # silu in fp32, times up in fp32, as in MLP
        return self._packed_mm(x.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        # W^T by numba once it has loaded (13x faster than `dequantized`'s element-wise ops, which took longer
        # than the matmuls themselves for a Q8_0 file; the same bits). Under PREFILL_ROWS rows torch's int4
        # kernel is faster (the default model's 120 matrices for 8 rows: 13-26 against 31-39 ms), but only it
        # needs its scales: where numba serves, a short question takes the dense path too
        weight_t = packed_gemv.dequantized_t(self, PREFILL_DTYPE) if x2.shape[0] > 1 else None
        if weight_t is not None or x2.shape[0] >= PREFILL_ROWS:
            y = x2.to(PREFILL_DTYPE) @ (weight_t if weight_t is not None else self.dequantized(PREFILL_DTYPE).T)
        elif x2.shape[0] == 1:
            y = self.one_row(x2)
        else:
            y = self._packed_mm(x2.to(torch.bfloat16))
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
