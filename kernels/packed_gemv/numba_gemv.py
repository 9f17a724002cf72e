"""One token's matmul over GGUF weights held in torch's CPU int4 packs: numba for the threads, LLVM IR for the
loop (the way `cpu_decode/numba_attention.py` is written, and for the same reason: numba's own loops do not
keep accumulators in registers).

A task is one block of R output rows over all the inputs (R = 64 where torch packs for AVX-512, 32 for AVX2:
`qlinear.PACK_BLOCK`). torch's layout keeps a block's bytes as [K][R/2], byte (k, j) holding rows j (low
nibble) and j + R/2 (high), so a task streams K * R/2 contiguous bytes: per input k, R/2 bytes are split into R
codes, widened to fp32 and multiplied by x[k] into R/16 vectors of 16 rows. At the end of each group of 32
inputs the group's sums become weights' sums with GGUF's own numbers, in fp32:

    y += d * (sum_p factor_p * acc_p + offset * sum(x))          Q4_0 (1 pack, offset -8), Q8_0 (2, -128)
    y += d * acc + m * sum(x)                                     Q4_1

which is sum_k w[k] x[k] for w = q * scale + offset per pack (`qlinear.pack_scale_offset`), reordered.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16
GROUP = 32

_f32, _f16, _i8, _i32, _i64 = ir.FloatType(), ir.HalfType(), ir.IntType(8), ir.IntType(32), ir.IntType(64)
_vf = ir.VectorType(_f32, LANES)
_vi = ir.VectorType(_i32, LANES)

# per GGUF kind: each pack's factor on d, the offset's factor on d times sum(x) (None: Q4_1's own m)
KINDS = {"Q4_0": ((1.0,), -8.0), "Q4_1": ((1.0,), None), "Q8_0": ((16.0, 1.0), -128.0)}


def _address(b, base, offset, typ):
    return b.inttoptr(b.add(b.ptrtoint(base, _i64), offset), ir.PointerType(typ))


def _splat(value, typ=_vf):
    return ir.Constant(typ, [value] * typ.count)


def _broadcast(b, scalar):
    one = b.insert_element(ir.Constant(_vf, ir.Undefined), scalar, ir.Constant(_i32, 0))
    return b.shuffle_vector(one, ir.Constant(_vf, ir.Undefined), ir.Constant(_vi, [0] * LANES))


def _half(b, x, part: int):
    """Lanes part*16 .. part*16+15 of a vector (of a 16-lane one, itself)."""
    return b.shuffle_vector(x, x, ir.Constant(_vi, list(range(part * LANES, (part + 1) * LANES))))


# a block's GGUF numbers for a group are rows x 2-4 bytes at a stride of N x 2-4 bytes from the last group's: a
# fresh line (and page) each group, which the hardware's streaming prefetch does not guess. Asked for one group
# ahead, the default model's 120 matmuls of a step (each weight read once, from memory) took 3.0-3.1 against
# 3.9-4.0 ms (Q4_1) and 8.4-8.6 against 8.9-9.4 (Q8_0) on 2 AVX-512 cores, alternating in one process; two
# groups ahead was as fast for Q4_1 and slower for Q8_0
NUMBERS_AHEAD = 1


def prefetch_numbers(module, b, numbers, g, n_count, block, rows: int, n_numbers: int) -> None:
    """Ask for the numbers of group g + NUMBERS_AHEAD of this block (a prefetch past the end is harmless)."""
    fn = cgutils.get_or_insert_function(module, ir.FunctionType(ir.VoidType(), [ir.PointerType(_i8), _i32, _i32, _i32]),
                                        "llvm.prefetch.p0")
    ahead = b.add(g, ir.Constant(_i64, NUMBERS_AHEAD))
    at = b.mul(b.add(b.mul(ahead, n_count), b.mul(block, ir.Constant(_i64, rows))), ir.Constant(_i64, 2 * n_numbers))
    for line in range(0, rows * 2 * n_numbers, 64):  # read, keep in every cache level, data
        b.call(fn, [_address(b, numbers, b.add(at, ir.Constant(_i64, line)), _i8), ir.Constant(_i32, 0),
                    ir.Constant(_i32, 3), ir.Constant(_i32, 1)])


def group_numbers(b, numbers, g, n_count, block, rows: int, n_numbers: int, part: int):
    """GGUF's fp16 numbers ([groups, N, n_numbers]) of group g for rows part*16 .. part*16+15 of the block, as
    fp32 vectors: (d, m) for Q4_1, (d, None) for the kinds with one number."""
    at = b.mul(b.add(b.mul(g, n_count), b.add(b.mul(block, ir.Constant(_i64, rows)), ir.Constant(_i64, part * LANES))),
               ir.Constant(_i64, 2 * n_numbers))
    if n_numbers == 1:
        return b.fpext(b.load(_address(b, numbers, at, ir.VectorType(_f16, LANES)), align=2), _vf), None
    pair = b.load(_address(b, numbers, at, ir.VectorType(_f16, 2 * LANES)), align=2)
    return tuple(b.fpext(b.shuffle_vector(pair, pair, ir.Constant(_vi, list(range(first, 2 * LANES, 2)))), _vf)
                 for first in (0, 1))


def _block_function(module, qtype: str, rows: int):
    """void block(i8* packs[2], i8* numbers (fp16), float* x, float* y, i64 K, i64 N, i64 block): y[block's `rows`
    rows] = the rows' weights times x."""
    name = f"salachat_packed_gemv_{qtype}_{rows}"
    parts, halves = rows // LANES, rows // (2 * LANES)  # vectors of 16 rows a block; of them, in each nibble
    vb = ir.VectorType(_i8, rows // 2)
    if name in module.globals:
        return module.globals[name]
    factors, offset = KINDS[qtype]
    n_numbers = 2 if offset is None else 1
    ptr8 = ir.PointerType(_i8)
    fnty = ir.FunctionType(ir.VoidType(), [ptr8, ptr8, ptr8, ir.PointerType(_f32), ir.PointerType(_f32), _i64, _i64,
                                          _i64])
    fn = ir.Function(module, fnty, name)
    fn.linkage = "internal"
    pack0, pack1, numbers, x_ptr, y_ptr, k_count, n_count, block = fn.args
    packs = (pack0, pack1)[: len(factors)]
    fma = cgutils.get_or_insert_function(module, ir.FunctionType(_vf, [_vf, _vf, _vf]), "llvm.fma.v16f32")
    vsum = cgutils.get_or_insert_function(module, ir.FunctionType(_f32, [_f32, _vf]), "llvm.vector.reduce.fadd.v16f32")
    entry, body, done = fn.append_basic_block("entry"), fn.append_basic_block("group"), fn.append_basic_block("done")
    b = ir.IRBuilder(entry)
    block_bytes = b.mul(b.mul(block, k_count), ir.Constant(_i64, rows // 2))  # a block's [K][R/2] bytes start here
    y_acc = [b.alloca(_vf) for _ in range(parts)]
    for a in y_acc:
        b.store(_splat(0.0), a)
    groups = b.udiv(k_count, ir.Constant(_i64, GROUP))
    b.cbranch(b.icmp_signed(">", groups, ir.Constant(_i64, 0)), body, done)

    b.position_at_end(body)
    g = b.phi(_i64)
    g.add_incoming(ir.Constant(_i64, 0), entry)
    prefetch_numbers(module, b, numbers, g, n_count, block, rows, n_numbers)
    k0 = b.mul(g, ir.Constant(_i64, GROUP))
    xs = [b.load(_address(b, x_ptr, b.mul(b.add(k0, ir.Constant(_i64, kk)), ir.Constant(_i64, 4)), _f32))
          for kk in range(GROUP)]
    x_lo = b.load(_address(b, x_ptr, b.mul(k0, ir.Constant(_i64, 4)), _vf), align=4)
    x_hi = b.load(_address(b, x_ptr, b.mul(b.add(k0, ir.Constant(_i64, LANES)), ir.Constant(_i64, 4)), _vf), align=4)
    x_sum = b.call(vsum, [ir.Constant(_f32, 0.0), b.fadd(x_lo, x_hi)], fastmath=("reassoc",))
    group_bytes = b.add(block_bytes, b.mul(k0, ir.Constant(_i64, rows // 2)))
    accs = []
    for pack in packs:
        acc = [_splat(0.0) for _ in range(parts)]
        for kk in range(GROUP):
            raw = b.load(_address(b, pack, b.add(group_bytes, ir.Constant(_i64, kk * rows // 2)), vb), align=1)
            low = b.and_(raw, _splat(0xF, vb))
            high = b.lshr(raw, _splat(4, vb))
            xk = _broadcast(b, xs[kk])
            codes = [_half(b, nibble, h) for nibble in (low, high) for h in range(halves)]
            acc = [b.call(fma, [b.uitofp(c, _vf), xk, a]) for c, a in zip(codes, acc)]
        accs.append(acc)
    x_sum_v = _broadcast(b, x_sum)
    for part in range(parts):
        d, m = group_numbers(b, numbers, g, n_count, block, rows, n_numbers, part)
        total = accs[0][part] if factors[0] == 1.0 else b.fmul(accs[0][part], _splat(factors[0]))
        for factor, acc in zip(factors[1:], accs[1:]):
            total = b.call(fma, [acc[part], _splat(factor), total]) if factor != 1.0 else b.fadd(total, acc[part])
        y_part = b.load(y_acc[part])
        if offset is None:
            y_part = b.call(fma, [m, x_sum_v, b.call(fma, [d, total, y_part])])
        else:
            y_part = b.call(fma, [d, b.call(fma, [x_sum_v, _splat(offset), total]), y_part])
        b.store(y_part, y_acc[part])
    g_next = b.add(g, ir.Constant(_i64, 1))
    g.add_incoming(g_next, b.block)
    b.cbranch(b.icmp_signed("<", g_next, groups), body, done)

    b.position_at_end(done)
    y_at = b.mul(block, ir.Constant(_i64, rows * 4))
    for part in range(parts):
        b.store(b.load(y_acc[part]), _address(b, y_ptr, b.add(y_at, ir.Constant(_i64, part * LANES * 4)), _vf), align=4)
    b.ret_void()
    return fn


def pointer(context, builder, typ, value, to):
    """An argument as a pointer of LLVM type `to`: an array's data, or an address given as an integer."""
    if isinstance(typ, types.Array):
        return builder.bitcast(context.make_array(typ)(context, builder, value).data, to)
    return builder.inttoptr(value, to)


def _pointer_to(element):
    """An intrinsic: an integer address as a pointer to `element`s (for `numba.carray`)."""
    @intrinsic
    def as_pointer(typingctx, address):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(types.CPointer(element)))

        return types.CPointer(element)(address), codegen

    return as_pointer


f32_pointer, u8_pointer, u16_pointer = (_pointer_to(t) for t in (types.float32, types.uint8, types.uint16))


@intrinsic(prefer_literal=True)
def _block_task(typingctx, pack0, pack1, numbers, x, y, k, n, block, qtype, rows):
    """`_block_function` for one block: packs uint8 [N, K/2] (torch's int4 layout), numbers uint16 [K/32, N,
    n] (fp16 bits), x fp32 [K], y fp32 [N], all C-contiguous, as addresses; `qtype` a compile-time string,
    `rows` a compile-time int (the layout's rows a block)."""
    if not isinstance(qtype, types.StringLiteral) or not isinstance(rows, types.IntegerLiteral):
        return None
    kind, block_rows = qtype.literal_value, rows.literal_value

    def codegen(context, builder, signature, args):
        fn = _block_function(builder.module, kind, block_rows)
        ptr8, ptrf = ir.PointerType(_i8), ir.PointerType(_f32)
        at = [pointer(context, builder, signature.args[i], args[i], ptr8 if i < 3 else ptrf) for i in range(5)]
        builder.call(fn, at + [args[5], args[6], args[7]])
        return context.get_dummy_value()

    return types.none(pack0, pack1, numbers, x, y, k, n, block, qtype, rows), codegen


# addresses, not arrays: numba takes ~5-15 us to unbox each array made for a call (torch's views of a step's
# tensors are), more than the kernel itself on the model's small matrices. The last two: a norm's weight
# (its address) and eps, for the PROLOGUES that need them.
SIGNATURE = "void(int64, int64, int64, int64, int64, int64, int64, int64, int64, float32)"
PROLOGUES = {None: 0, "rms_norm": 1, "silu_mul": 2}  # what the kernel computes of x before its matmul


@njit(cache=True, nogil=True, error_model="numpy")
def prologue(mode, x, k, weight, eps):
    """The kernel's input from x at address `x`, fp32 [k]: x itself (mode 0), RMSNorm(x) with `weight` (1:
    x * (1 / sqrt(mean(x^2) + eps)) * weight, the sum of squares in float64), or silu(x[:k]) * x[k:] (2: x
    holds gate and up side by side, silu = g / (1 + exp(-g)))."""
    if mode == 0:
        return carray(f32_pointer(x), (k,))
    out = np.empty(k, np.float32)
    if mode == 1:
        v, w = carray(f32_pointer(x), (k,)), carray(f32_pointer(weight), (k,))
        total = 0.0
        for i in range(k):
            total += np.float64(v[i]) * np.float64(v[i])
        scale = np.float32(1.0) / np.sqrt(np.float32(total / k) + eps)
        for i in range(k):
            out[i] = w[i] * (v[i] * scale)
    else:
        v = carray(f32_pointer(x), (2 * k,))
        for i in range(k):
            g = v[i]
            out[i] = g / (np.float32(1.0) + np.exp(-g)) * v[k + i]
    return out


def _build(qtype: str, rows: int):
    kind, block_rows = qtype, rows

    @njit(SIGNATURE, parallel=True, cache=True, nogil=True, error_model="numpy")
    def gemv(pack0, pack1, numbers, x, y, k, n, mode, weight, eps):
        """y [n] = W prologue(x) for W held as packs [n, k/2] (pack1 unused but for Q8_0) and GGUF numbers
        [k/32, n, *]: the addresses of C-contiguous buffers."""
        h = prologue(mode, x, k, weight, eps)
        for block in prange(n // block_rows):
            _block_task(pack0, pack1, numbers, h, y, k, n, block, kind, block_rows)

    return gemv


_KERNELS: dict[tuple[str, int], object] = {}


def kernel(qtype: str, rows: int):
    """The compiled kernel for one GGUF kind and layout (64 or 32 rows a block; compiled once a process,
    numba's cache keeps it)."""
    if rows not in (32, 64):
        raise ValueError(f"no kernel for torch's int4 layout of {rows} rows a block")
    if (qtype, rows) not in _KERNELS:
        _KERNELS[qtype, rows] = _build(qtype, rows)
    return _KERNELS[qtype, rows]


@intrinsic
def _f16_value(typingctx, bits):
    """fp16 bits (uint16) as their fp32 value."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], _f16), _f32)

    return types.float32(types.uint16), codegen


ROW_KINDS = ("Q4_0", "Q4_1", "Q8_0")  # `rows`'s kind codes


@njit("void(int64, int64, int64, int64[::1], float32[:, ::1], int64, int64, int64)", cache=True, nogil=True,
      error_model="numpy")
def rows(pack0_at, pack1_at, numbers_at, index, out, n, kind, block_rows):
    """out [R, K] = the rows `index` [R] of W [n, K] in fp32, exactly as `QuantLinear.rows` computes them: per
    pack w = q * scale + offset (a product and a sum, each rounded), the packs' weights summed; `kind` indexes
    ROW_KINDS; the packs' addresses (uint8 [n * K / 2] in torch's layout of `block_rows` rows a block) and the
    numbers' (GGUF's fp16 bits [K/32, n, 1 or 2])."""
    k = out.shape[1]
    half = block_rows // 2
    n_numbers = 2 if kind == 1 else 1
    numbers = carray(u16_pointer(numbers_at), (k // GROUP, n, n_numbers))
    for r in range(index.shape[0]):
        row = index[r]
        base = (row // block_rows) * k * half + (row % block_rows) % half
        shift = 4 if row % block_rows >= half else 0
        for g in range(k // GROUP):
            d = _f16_value(numbers[g, row, 0])
            for p in range(2 if kind == 2 else 1):
                pack = carray(u8_pointer(pack0_at if p == 0 else pack1_at), (n * k // 2,))
                if kind == 1:
                    scale, offset = d, _f16_value(numbers[g, row, 1])
                elif kind == 0:
                    scale, offset = d, np.float32(-8.0) * d
                elif p == 0:
                    scale, offset = np.float32(16.0) * d, np.float32(-128.0) * d
                else:
                    scale, offset = d, np.float32(0.0)
                for i in range(g * GROUP, (g + 1) * GROUP):
                    w = np.float32((pack[base + i * half] >> shift) & 0xF) * scale + offset
                    out[r, i] = w if p == 0 else out[r, i] + w


def _dequant_function(module, qtype: str, rows: int, bf16: bool):
    """void dequant(i8* packs[2], i8* numbers (fp16), i8* out, i64 K, i64 N, i64 block, i64 g): out [K, N] (W^T,
    fp32 or bf16) at the group g's 32 inputs for the block's `rows` outputs.

    W^T because torch's layout keeps a block's bytes [K][R/2], byte (k, j) holding rows j and j + R/2: an
    input's codes for R rows are contiguous, and so are its R outputs in W^T, each with its own scale, so every
    step is a vector; W's own rows would read one byte in R/2 (numba's loops over them ran scalar, at ~1.2e9
    weights a second, no faster than torch's element-wise ops). Per pack w = q * scale + offset, a product and
    a sum each rounded (no fused multiply-add: the bits of `QuantLinear.dequantized`), the packs summed; bf16
    rounds to nearest even, a NaN to 0xFFFF (torch's vectorised conversion)."""
    name = f"salachat_dequant_{qtype}_{rows}_{'bf16' if bf16 else 'f32'}"
    if name in module.globals:
        return module.globals[name]
    parts, halves = rows // LANES, rows // (2 * LANES)
    vb, vw = ir.VectorType(_i8, rows // 2), ir.VectorType(ir.IntType(16), LANES)
    factors, offset = KINDS[qtype]
    n_numbers = 2 if offset is None else 1
    ptr8 = ir.PointerType(_i8)
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [ptr8, ptr8, ptr8, ptr8, _i64, _i64, _i64, _i64]), name)
    fn.linkage = "internal"
    pack0, pack1, numbers, out, k_count, n_count, block, g = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    c64 = lambda v: ir.Constant(_i64, v)  # noqa: E731
    first_row = b.mul(block, c64(rows))
    scales, offsets, lows = [], [], []  # per 16 rows: each pack's (scale, offset); Q8_0's low pack: d, 0
    for part in range(parts):
        d, m = group_numbers(b, numbers, g, n_count, block, rows, n_numbers, part)
        scales.append(d if factors[0] == 1.0 else b.fmul(_splat(factors[0]), d))
        offsets.append(m if offset is None else b.fmul(_splat(offset), d))
        lows.append(d)
    k0 = b.mul(g, c64(GROUP))
    group_bytes = b.add(b.mul(b.mul(block, k_count), c64(rows // 2)), b.mul(k0, c64(rows // 2)))
    c32 = lambda v: _splat(v, _vi)  # noqa: E731
    for kk in range(GROUP):
        codes = []
        for pack in (pack0, pack1)[: len(factors)]:
            raw = b.load(_address(b, pack, b.add(group_bytes, c64(kk * rows // 2)), vb), align=1)
            low, high = b.and_(raw, _splat(0xF, vb)), b.lshr(raw, _splat(4, vb))
            codes.append([b.uitofp(_half(b, nibble, h), _vf) for nibble in (low, high) for h in range(halves)])
        row_at = b.add(b.mul(b.add(k0, c64(kk)), n_count), first_row)  # element (k, first row) of W^T
        for part in range(parts):
            w = b.fadd(b.fmul(codes[0][part], scales[part]), offsets[part])
            if len(factors) > 1:
                w = b.fadd(w, b.fadd(b.fmul(codes[1][part], lows[part]), _splat(0.0)))
            at = b.add(row_at, c64(part * LANES))
            if not bf16:
                b.store(w, _address(b, out, b.mul(at, c64(4)), _vf), align=4)
                continue
            bits = b.bitcast(w, _vi)
            rounded = b.lshr(b.add(b.add(bits, c32(0x7FFF)), b.and_(b.lshr(bits, c32(16)), c32(1))), c32(16))
            nan = b.icmp_unsigned(">", b.and_(bits, c32(0x7FFFFFFF)), c32(0x7F800000))
            b.store(b.trunc(b.select(nan, c32(0xFFFF), rounded), vw), _address(b, out, b.mul(at, c64(2)), vw), align=2)
    b.ret_void()
    return fn


@intrinsic(prefer_literal=True)
def _dequant_task(typingctx, pack0, pack1, numbers, out, k, n, block, g, qtype, rows, bf16):
    """`_dequant_function` for one (block, group); the last three compile-time literals."""
    if not all(isinstance(a, t) for a, t in ((qtype, types.StringLiteral), (rows, types.IntegerLiteral),
                                             (bf16, types.BooleanLiteral))):
        return None
    kind, block_rows, narrow = qtype.literal_value, rows.literal_value, bf16.literal_value

    def codegen(context, builder, signature, args):
        fn = _dequant_function(builder.module, kind, block_rows, narrow)
        at = [builder.inttoptr(a, ir.PointerType(_i8)) for a in args[:4]]
        builder.call(fn, at + list(args[4:8]))
        return context.get_dummy_value()

    return types.none(pack0, pack1, numbers, out, k, n, block, g, qtype, rows, bf16), codegen


_DEQUANT: dict[tuple[str, int, bool], object] = {}


def dequant_kernel(qtype: str, rows: int, bf16: bool):
    """dequant(pack0, pack1, numbers, out, k, n), the addresses of C-contiguous buffers: out [k, n] = W^T in
    fp32 or bf16 (`_dequant_function`), one task a block of rows and a group of inputs (compiled once a
    process, numba's cache keeps it)."""
    key = (qtype, rows, bf16)
    if key not in _DEQUANT:
        kind, block_rows, narrow = key

        @njit("void(int64, int64, int64, int64, int64, int64)", parallel=True, cache=True, nogil=True,
              error_model="numpy")
        def dequant(pack0, pack1, numbers, out, k, n):
            groups = k // GROUP
            for task in prange(n // block_rows * groups):
                _dequant_task(pack0, pack1, numbers, out, k, n, task // groups, task % groups, kind, block_rows,
                              narrow)

        _DEQUANT[key] = dequant
    return _DEQUANT[key]
