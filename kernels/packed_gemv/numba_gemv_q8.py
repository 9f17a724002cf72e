"""One token's matmul over torch's CPU int4 packs with the activations rounded to 8 bits, as llama.cpp's CPU
path does: integer dot products by AVX2's `vpmaddubsw` (32 byte products, summed in pairs, an instruction).

The fp32 kernel (`numba_gemv.py`) widens every 4-bit code to fp32 before its FMA, four widenings, four
conversions and four FMAs for 32 codes; this one multiplies the codes as bytes. x is rounded per group of 32
inputs, as the weights are: x ~ s X with s = max|x| / 127 and X = rint(x * 127 / max|x|) in [-127, 127]
(`reference.quantized_activations`). In torch's layout a block's bytes are [K][R/2], byte (k, j) holding
rows j and j + R/2, so the pairs `vpmaddubsw` sums are two inputs of one row: the bytes of inputs k and k+1
are loaded together, split into nibbles and interleaved row by row, and multiplied by (X[k], X[k+1]) repeated.
A pair's sum is at most 2 * 15 * 127, so eight pairs add in 16 bits before widening to 32. At the end of each
group the integer sums become the weights' sums, exactly in integers and then once in fp32:

    y += d * (s * (sum_p factor_p * acc_p + offset * sum(X)))       Q4_0 (1 pack, offset -8), Q8_0 (2, -128)
    y += d * (s * acc) + m * (s * sum(X))                           Q4_1

which is sum_k w[k] x^[k] for the file's weights w and x^ = s X.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from salachat.kernels import cpu_jit

from .numba_gemv import (GROUP, KINDS, LANES, SIGNATURE, _address, _broadcast, _f32, _i8, _i32, _i64, _splat, _vf,
                          _vi, group_numbers, pointer, prefetch_numbers, prologue)

_i16 = ir.IntType(16)
_v16i16 = ir.VectorType(_i16, LANES)
_v32i8 = ir.VectorType(_i8, 2 * LANES)
_v16i32 = ir.VectorType(_i32, LANES)
PAIRS_IN_16_BITS = 8  # 8 * (2 * 15 * 127) < 2**15


def available() -> bool:
    """Whether this CPU has AVX2 (LLVM aborts the process on an instruction the target lacks)."""
    from llvmlite import binding

    return bool(binding.get_host_cpu_features().get("avx2", False))


def _splat_int(b, scalar, typ=_v16i32):
    one = b.insert_element(ir.Constant(typ, ir.Undefined), scalar, ir.Constant(_i32, 0))
    return b.shuffle_vector(one, ir.Constant(typ, ir.Undefined), ir.Constant(_vi, [0] * typ.count))


def _block_function(module, qtype: str, rows: int):
    """void block(i8* packs[2], i8* numbers (fp16), i8* X, float* s, i32* sum(X), float* y, i64 K, i64 N, i64
    block): y[block's `rows` rows] = the rows' weights times s X."""
    name = f"salachat_packed_gemv_q8_{qtype}_{rows}"
    if name in module.globals:
        return module.globals[name]
    parts, halves, half = rows // LANES, rows // (2 * LANES), rows // 2
    factors, offset = KINDS[qtype]
    n_numbers = 2 if offset is None else 1
    ptr8 = ir.PointerType(_i8)
    fnty = ir.FunctionType(ir.VoidType(), [ptr8, ptr8, ptr8, ptr8, ir.PointerType(_f32), ir.PointerType(_i32),
                                          ir.PointerType(_f32), _i64, _i64, _i64])
    fn = ir.Function(module, fnty, name)
    fn.linkage = "internal"
    pack0, pack1, numbers, xq, xs, xsum, y_ptr, k_count, n_count, block = fn.args
    packs = (pack0, pack1)[: len(factors)]
    fma = cgutils.get_or_insert_function(module, ir.FunctionType(_vf, [_vf, _vf, _vf]), "llvm.fma.v16f32")
    maddubs = cgutils.get_or_insert_function(module, ir.FunctionType(_v16i16, [_v32i8, _v32i8]),
                                             "llvm.x86.avx2.pmadd.ub.sw")
    entry, body, done = fn.append_basic_block("entry"), fn.append_basic_block("group"), fn.append_basic_block("done")
    b = ir.IRBuilder(entry)
    block_bytes = b.mul(b.mul(block, k_count), ir.Constant(_i64, half))
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
    group_bytes = b.add(block_bytes, b.mul(k0, ir.Constant(_i64, half)))
    # (X[k], X[k+1]) as one i16, repeated: the signed operand of every pair's products
    x_pairs = []
    for pair in range(GROUP // 2):
        xp = b.load(_address(b, xq, b.add(k0, ir.Constant(_i64, 2 * pair)), _i16), align=1)
        x_pairs.append(b.bitcast(_splat_int(b, xp, _v16i16), _v32i8))
    # row r of a nibble's vector sits at byte r (input k) and byte half + r (input k + 1)
    interleave = [ir.Constant(ir.VectorType(_i32, 2 * LANES), [i for r in range(h * LANES, (h + 1) * LANES)
                                                              for i in (r, half + r)]) for h in range(halves)]
    accs = []
    for pack in packs:
        acc32 = [ir.Constant(_v16i32, [0] * LANES) for _ in range(parts)]
        for first in range(0, GROUP // 2, PAIRS_IN_16_BITS):
            acc16 = [ir.Constant(_v16i16, [0] * LANES) for _ in range(parts)]
            for pair in range(first, first + PAIRS_IN_16_BITS):
                raw = b.load(_address(b, pack, b.add(group_bytes, ir.Constant(_i64, pair * rows)),
                                      ir.VectorType(_i8, rows)), align=1)
                nibbles = (b.and_(raw, _splat(0xF, raw.type)), b.lshr(raw, _splat(4, raw.type)))
                for n, nibble in enumerate(nibbles):
                    for h in range(halves):
                        codes = b.shuffle_vector(nibble, nibble, interleave[h])
                        part = n * halves + h
                        acc16[part] = b.add(acc16[part], b.call(maddubs, [codes, x_pairs[pair]]))
            acc32 = [b.add(a32, b.sext(a16, _v16i32)) for a32, a16 in zip(acc32, acc16)]
        accs.append(acc32)
    s = b.load(_address(b, xs, b.mul(g, ir.Constant(_i64, 4)), _f32))
    x_sum = b.load(_address(b, xsum, b.mul(g, ir.Constant(_i64, 4)), _i32))
    s_v = _broadcast(b, s)
    if offset is not None:
        offset_v = _splat_int(b, b.mul(x_sum, ir.Constant(_i32, int(offset))))
    else:
        m_term = _broadcast(b, b.fmul(s, b.sitofp(x_sum, _f32)))
    for part in range(parts):
        d, m = group_numbers(b, numbers, g, n_count, block, rows, n_numbers, part)
        total = None
        for factor, acc in zip(factors, accs):
            term = acc[part] if factor == 1.0 else b.mul(acc[part], ir.Constant(_v16i32, [int(factor)] * LANES))
            total = term if total is None else b.add(total, term)
        if offset is not None:
            total = b.add(total, offset_v)
        scaled = b.fmul(b.sitofp(total, _vf), s_v)
        y_part = b.call(fma, [d, scaled, b.load(y_acc[part])])
        if offset is None:
            y_part = b.call(fma, [m, m_term, y_part])
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


@intrinsic(prefer_literal=True)
def _block_task(typingctx, pack0, pack1, numbers, xq, xs, xsum, y, k, n, block, qtype, rows):
    """`_block_function` for one block: packs uint8 [N, K/2], numbers uint16 [K/32, N, n] (fp16 bits), X int8
    [K], s fp32 [K/32], sum(X) int32 [K/32], y fp32 [N], C-contiguous, as arrays or addresses; `qtype`,
    `rows` compile-time."""
    if not isinstance(qtype, types.StringLiteral) or not isinstance(rows, types.IntegerLiteral):
        return None
    kind, block_rows = qtype.literal_value, rows.literal_value

    def codegen(context, builder, signature, args):
        fn = _block_function(builder.module, kind, block_rows)
        to = [ir.PointerType(_i8)] * 4 + [ir.PointerType(_f32), ir.PointerType(_i32), ir.PointerType(_f32)]
        at = [pointer(context, builder, signature.args[i], args[i], to[i]) for i in range(7)]
        builder.call(fn, at + [args[7], args[8], args[9]])
        return context.get_dummy_value()

    return types.none(pack0, pack1, numbers, xq, xs, xsum, y, k, n, block, qtype, rows), codegen


@njit("void(float32[::1], int8[::1], float32[::1], int32[::1])", cache=True, nogil=True, error_model="numpy")
def quantize(x, xq, xs, xsum):
    """x fp32 [K] -> X int8 [K], s fp32 [K/32], sum(X) int32 [K/32] (`reference.quantized_activations`)."""
    for g in range(x.shape[0] // GROUP):
        amax = np.float32(0.0)
        for i in range(g * GROUP, (g + 1) * GROUP):
            amax = max(amax, abs(x[i]))
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        total = 0
        for i in range(g * GROUP, (g + 1) * GROUP):
            q = int(np.rint(x[i] * inv))
            q = min(127, max(-127, q))
            xq[i] = q
            total += q
        xs[g] = amax / np.float32(127.0)
        xsum[g] = total


def _build(qtype: str, rows: int):
    kind, block_rows = qtype, rows
    TAKEN_IN = cpu_jit.sources_digest(Path(__file__).with_name("numba_gemv.py"))  # prologue's, the helpers'

    @njit(SIGNATURE, parallel=True, cache=True, nogil=True, error_model="numpy")
    def gemv(pack0, pack1, numbers, x, y, k, n, mode, weight, eps):
        """y [n] = W x^ for W held as packs [n, k/2] (pack1 unused but for Q8_0) and GGUF numbers [k/32, n, *],
        x^ = prologue(x) rounded to 8 bits a group of 32: the addresses of C-contiguous buffers."""
        h = prologue(mode, x, k, weight + 0 * TAKEN_IN, eps)
        xq = np.empty(k, np.int8)
        xs = np.empty(k // GROUP, np.float32)
        xsum = np.empty(k // GROUP, np.int32)
        quantize(h, xq, xs, xsum)
        for block in prange(n // block_rows):
            _block_task(pack0, pack1, numbers, xq, xs, xsum, y, k, n, block, kind, block_rows)

    return gemv


_KERNELS: dict[tuple[str, int], object] = {}


def kernel(qtype: str, rows: int):
    """The compiled kernel for one GGUF kind and layout (64 or 32 rows a block); AVX2 CPUs only (`available`)."""
    if rows not in (32, 64):
        raise ValueError(f"no kernel for torch's int4 layout of {rows} rows a block")
    if (qtype, rows) not in _KERNELS:
        _KERNELS[qtype, rows] = _build(qtype, rows)
    return _KERNELS[qtype, rows]
