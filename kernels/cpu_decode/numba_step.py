"""A packed Llama-family model's decode step through all its layers in one numba call.

Each of a step's pieces already has its kernel: the packed matmuls with the norms and SiLU inside them
(`packed_gemv`) and the attention over the 16-bit cache (`numba_attention`). Called from Python one by one
they were half a step's time on a small model: on a 2-core AVX2 machine the default model's 30 layers took
10.8 ms of matmuls where the kernels alone take 5.7, each torch call between them (a view, a slice, RoPE's
four ops, the cache's append, a residual add) 5-8 us. Here the same kernels are called from compiled code with
RoPE, the rounding of q, k and v to 16 bits, the cache's append and the residual adds written as loops, in the
order and with the roundings of `Block.decode_packed`, so the step computes the same bits (the attention
always the numba kernel's, which `decode_packed` takes from MIN_KEYS keys on).

A layer is one row of int64 in `table` (COLUMNS): its weights' buffers and kinds, its norms' weights and its
cache's buffers and strides, all addresses; the hidden state x is updated in place.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.extending import intrinsic
from salachat.kernels import cpu_jit
from salachat.kernels.cpu_decode.numba_attention import _attend_task, merge
from salachat.kernels.packed_gemv import numba_gemv, numba_gemv_q8
from salachat.kernels.packed_gemv.numba_gemv import f32_pointer, pointer, prologue, u16_pointer
from salachat.kernels.packed_gemv.numba_gemv_q8 import quantize

MATRICES = ("qkv", "o", "gate_up", "down")  # each: pack0, pack1, numbers, kind (index in KINDS)
KINDS = ("Q4_0", "Q4_1", "Q8_0")
COLUMNS = tuple(f"{m}.{part}" for m in MATRICES for part in ("pack0", "pack1", "numbers", "kind")) + (
    "input_norm", "post_norm", "keys", "values", "keys.head", "keys.row", "values.head", "values.row")
_NORM_IN, _NORM_POST, _K, _V, _KH, _KR, _VH, _VR = range(16, 24)

SIGNATURE = ("void(int64, int64[:, ::1], int64, int64, int64, int64, int64, int64, float32, float64, int64, "
             "float32[:, :, ::1])")


@intrinsic
def _address(typingctx, array):
    """The address of a C-contiguous array's data."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, ir.IntType(64))

    return types.int64(array), codegen


@intrinsic
def _f32_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _f16_bits(typingctx, value):
    """fp32 to fp16 rounded to nearest even (LLVM's fptrunc, as torch's conversion), as its bits."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@njit(inline="always")
def _bf16_bits(value):
    """fp32 to bf16 rounded to nearest even, NaN to 0x7FC0: torch's conversion."""
    bits = np.int64(_f32_bits(value))
    if (bits & 0x7FFFFFFF) > 0x7F800000:
        return np.uint16(0x7FC0)
    return np.uint16((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)


@intrinsic(prefer_literal=True)
def _matvec_block(typingctx, pack0, pack1, numbers, xq, xs, xsum, xf, y, k, n, block, qtype, rows, rounded):
    """One block of a packed matmul (`packed_gemv`): the integer kernel's over X, s, sum(X) (`rounded`, all
    compile-time but the data) or the fp32 kernel's over xf; packs, numbers and y as addresses."""
    if not (isinstance(qtype, types.StringLiteral) and isinstance(rows, types.IntegerLiteral)
            and isinstance(rounded, types.BooleanLiteral)):
        return None
    kind, block_rows, integer = qtype.literal_value, rows.literal_value, rounded.literal_value

    def codegen(context, builder, signature, args):
        i8p, f32p, i32p = ir.PointerType(ir.IntType(8)), ir.PointerType(ir.FloatType()), ir.PointerType(ir.IntType(32))
        at = lambda i, to: pointer(context, builder, signature.args[i], args[i], to)
        packs = [at(0, i8p), at(1, i8p), at(2, i8p)]
        if integer:
            fn = numba_gemv_q8._block_function(builder.module, kind, block_rows)
            builder.call(fn, packs + [at(3, i8p), at(4, f32p), at(5, i32p), at(7, f32p), args[8], args[9], args[10]])
        else:
            fn = numba_gemv._block_function(builder.module, kind, block_rows)
            builder.call(fn, packs + [at(6, f32p), at(7, f32p), args[8], args[9], args[10]])
        return context.get_dummy_value()

    return types.none(pack0, pack1, numbers, xq, xs, xsum, xf, y, k, n, block, qtype, rows, rounded), codegen


@njit(inline="always")
def _bits16(value, half):
    return _f16_bits(value) if half else _bf16_bits(value)


def _build(group: int, dim: int, half: bool, rows: int, rounded: bool):
    """The step for G = `group` query heads a KV head, head size `dim`, an fp16 (`half`) or bf16 cache, torch's
    int4 layout of `rows` rows a block, integer (`rounded`) or fp32 matmuls. The kernels' parallel loops are
    written here, not called: numba caches a function that calls other compiled functions only when they are
    module globals, and these are built per layout."""
    G, D, HALF, ROWS, ROUNDED, H = group, dim, half, rows, rounded, int(half)
    here = Path(__file__).parent  # the sources whose code the step takes in (`cpu_jit.sources_digest`)
    CALLEES = cpu_jit.sources_digest(here / "numba_attention.py", here.parent / "packed_gemv" / "numba_gemv.py",
                                     here.parent / "packed_gemv" / "numba_gemv_q8.py")

    @njit(SIGNATURE, parallel=True, cache=True, nogil=True, error_model="numpy")
    def step(x_at, table, length, cos_at, sin_at, hidden, kv_heads, inter, eps, scale, splits, partial):
        """x fp32 [hidden] at `x_at` through every layer of `table` for the token at position `length` (each
        layer's cache holds `length` keys and room for one more, which the step writes); cos and sin_signed
        fp32 [D] at `cos_at`, `sin_at` (sin with its first half negated: rotate_half as a roll); partial fp32
        [kv_heads * splits, G, D + 2] the attention's scratch."""
        heads = kv_heads * G + 0 * CALLEES
        width = (heads + 2 * kv_heads) * D
        x = carray(f32_pointer(x_at), (hidden,))
        cos, sin = carray(f32_pointer(cos_at), (D,)), carray(f32_pointer(sin_at), (D,))
        qkv = np.empty(width, np.float32)
        q16 = np.empty(heads * D, np.uint16)
        attn = np.empty((kv_heads, G, D), np.float32)
        gate_up = np.empty(2 * inter, np.float32)
        y = np.empty(hidden, np.float32)
        roped = np.empty(D, np.float32)
        widest = max(hidden, heads * D, inter)
        xq = np.empty(widest, np.int8)
        xs = np.empty(widest // 32, np.float32)
        xsum = np.empty(widest // 32, np.int32)
        half_d = D // 2
        span = (length + 1 + splits - 1) // splits
        for layer in range(table.shape[0]):
            t = table[layer]
            for m in range(4):  # q/k/v, o, gate/up, down: (input, output, inputs, outputs, prologue, norm)
                if m == 0:
                    x_in, out, k, n, mode, norm = x_at, _address(qkv), hidden, width, 1, t[_NORM_IN]
                elif m == 1:
                    x_in, out, k, n, mode, norm = _address(attn), _address(y), heads * D, hidden, 0, 0
                elif m == 2:
                    x_in, out, k, n, mode, norm = x_at, _address(gate_up), hidden, 2 * inter, 1, t[_NORM_POST]
                else:
                    x_in, out, k, n, mode, norm = _address(gate_up), _address(y), inter, hidden, 2, 0
                h = prologue(mode, x_in, k, norm, eps)
                if ROUNDED:
                    quantize(h, xq[:k], xs[: k // 32], xsum[: k // 32])
                kind, p0, p1, nums = t[4 * m + 3], t[4 * m], t[4 * m + 1], t[4 * m + 2]
                if kind == 0:
                    for blk in prange(n // ROWS):
                        _matvec_block(p0, p1, nums, xq, xs, xsum, h, out, k, n, blk, "Q4_0", ROWS, ROUNDED)
                elif kind == 1:
                    for blk in prange(n // ROWS):
                        _matvec_block(p0, p1, nums, xq, xs, xsum, h, out, k, n, blk, "Q4_1", ROWS, ROUNDED)
                else:
                    for blk in prange(n // ROWS):
                        _matvec_block(p0, p1, nums, xq, xs, xsum, h, out, k, n, blk, "Q8_0", ROWS, ROUNDED)
                if m == 0:
                    for hd in range(heads + kv_heads):  # RoPE on q and k: x * cos + roll(x, D/2) * sin_signed
                        base = hd * D
                        for i in range(D):
                            j = i + half_d if i < half_d else i - half_d
                            a = qkv[base + i] * cos[i]
                            b = qkv[base + j] * sin[i]
                            roped[i] = a + b
                        if hd < heads:
                            for i in range(D):
                                q16[base + i] = _bits16(roped[i], HALF)
                        else:  # this token's key and value, rounded to 16 bits into the cache's next row
                            kh = hd - heads
                            k_row = carray(u16_pointer(t[_K] + 2 * (kh * t[_KH] + length * t[_KR])), (D,))
                            v_row = carray(u16_pointer(t[_V] + 2 * (kh * t[_VH] + length * t[_VR])), (D,))
                            v_at = (heads + kv_heads + kh) * D
                            for i in range(D):
                                k_row[i] = _bits16(roped[i], HALF)
                                v_row[i] = _bits16(qkv[v_at + i], HALF)
                    strides = (t[_KH], t[_KR], t[_VH], t[_VR])
                    for task in prange(kv_heads * splits):
                        lo = (task % splits) * span
                        _attend_task(_address(q16), t[_K], t[_V], strides, task // splits, lo, min(length + 1, lo + span),
                                     scale, partial[task], G, D, H)
                    merge(partial, attn, splits)
                elif m != 2:  # the residual adds, in fp32
                    for i in range(hidden):
                        x[i] = x[i] + y[i]

    return step


_KERNELS: dict[tuple, object] = {}


def kernel(group: int, dim: int, half: bool, rows: int, rounded: bool):
    """The compiled step for G = `group`, D = `dim`, an fp16 (`half`) or bf16 cache, torch's int4 layout of
    `rows` rows a block, and the integer matmuls (`rounded`: AVX2 only) or the fp32 ones (compiled once a
    process, numba's cache keeps it)."""
    key = (group, dim, half, rows, rounded)
    if key not in _KERNELS:
        _KERNELS[key] = _build(*key)
    return _KERNELS[key]
