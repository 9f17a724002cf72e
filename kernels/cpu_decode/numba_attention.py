"""One query token's attention over a 16-bit KV cache (bf16 or fp16) on the CPU: numba for the threads, LLVM IR for
the loop.

A task is one KV head over one range of keys, all of the head's G query rows at once: an online softmax over
groups of 16 keys, written as LLVM vector code (`_task_function`), because numba's loops left the costly
parts scalar or in memory (a horizontal sum per score, the running output loaded and stored at every key,
glibc's expf per element). Per group: each key's row is widened to fp32 (bf16 by a shift, fp16 by the
conversion instruction), multiplied with the
G query rows in registers, and the 16 keys' partial sums are folded into one vector of 16 scores by a tree of
shuffles (about 3 operations a score instead of 8); exp is a polynomial over the vector; the group's values
are added into the G x D outputs held in registers. Scores, softmax and sums are fp32. The tasks run in a
numba `prange` and are merged by log-sum-exp.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from salachat.kernels import cpu_jit

from salachat.kernels.packed_gemv.numba_gemv import f32_pointer

LANES = 16  # fp32 lanes a vector: a group of keys, and a head's row in D / 16 pieces
LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453

_f32, _i16, _i32, _i64 = ir.FloatType(), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_vf, _vh, _vi = ir.VectorType(_f32, LANES), ir.VectorType(_i16, LANES), ir.VectorType(_i32, LANES)


def _intrinsic_fn(module, name: str, ret, args):
    return cgutils.get_or_insert_function(module, ir.FunctionType(ret, args), name)


def _address(b, base, offset, typ):
    """A pointer to `typ` at `base` + `offset` bytes."""
    return b.inttoptr(b.add(b.ptrtoint(base, _i64), offset), ir.PointerType(typ))


def _widen(b, bits, half: bool):
    """16 bf16s or (`half`) fp16s, as i16, to fp32: bf16 zero-extended and shifted into the top half."""
    if half:
        return b.fpext(b.bitcast(bits, ir.VectorType(ir.HalfType(), LANES)), _vf)
    return b.bitcast(b.shl(b.zext(bits, _vi), _splat(16, _vi)), _vf)


def _splat(value, typ=_vf):
    return ir.Constant(typ, [value] * LANES)


def _broadcast(b, scalar, typ=_vf):
    """A vector of `scalar` in every lane."""
    one = b.insert_element(ir.Constant(typ, ir.Undefined), scalar, ir.Constant(_i32, 0))
    return b.shuffle_vector(one, ir.Constant(typ, ir.Undefined), ir.Constant(_vi, [0] * LANES))


def _exp(b, fns, x):
    """exp(x) for x <= 0: 2^i * 2^f with i = round(x log2 e), |f| <= 1/2, 2^f = e^(f ln 2) by its Taylor series
    to degree 7 (relative error ~1e-7); i is clamped at -127, whose exponent bits give 0.0."""
    t = b.call(fns["maxnum"], [b.fmul(x, _splat(LOG2E)), _splat(-127.0)])
    i = b.call(fns["floor"], [b.fadd(t, _splat(0.5))])
    f = b.fmul(b.fsub(t, i), _splat(LN2))
    p = _splat(1 / 5040)
    for c in (1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0):
        p = b.call(fns["fma"], [p, f, _splat(c)])
    bits = b.shl(b.add(b.fptosi(i, _vi), _splat(127, _vi)), _splat(23, _vi))
    return b.fmul(p, b.bitcast(bits, _vf))


def _fold(b, x, y, width: int):
    """One level of the tree: x and y hold items in blocks of 2 * width lanes; the result holds x's items then
    y's, each summed down to `width` lanes."""
    blocks = range(LANES // (2 * width))
    lo = [blk * 2 * width + i for blk in blocks for i in range(width)]
    lo = lo + [LANES + m for m in lo]
    hi = [m + width for m in lo]
    return b.fadd(b.shuffle_vector(x, y, ir.Constant(_vi, lo)), b.shuffle_vector(x, y, ir.Constant(_vi, hi)))


def _task_function(module, group: int, dim: int, half: bool):
    """void task(i16* q [G, D] (bf16 or, `half`, fp16 bits), i8* k, i8* v, i64 k_row_bytes, i64 v_row_bytes, i64 lo, i64 hi, float scale,
    float* out [G, D + 2]): out = the unnormalised softmax-weighted sum of v[lo:hi], then the max score and the
    sum of exp(score - max), for the G query rows; k and v point at key 0 of the head, rows of D 16-bit floats."""
    name = f"salachat_decode_task_g{group}_d{dim}_{'f16' if half else 'bf16'}"
    if name in module.globals:
        return module.globals[name]
    chunks = dim // LANES
    fnty = ir.FunctionType(ir.VoidType(), [ir.PointerType(_i16), ir.PointerType(ir.IntType(8)),
                                          ir.PointerType(ir.IntType(8)), _i64, _i64, _i64, _i64, _f32,
                                          ir.PointerType(_f32)])
    fn = ir.Function(module, fnty, name)
    fn.linkage = "internal"
    q_ptr, k_ptr, v_ptr, k_row, v_row, lo, hi, scale, out_ptr = fn.args
    fns = {"maxnum": _intrinsic_fn(module, "llvm.maxnum.v16f32", _vf, [_vf, _vf]),
           "floor": _intrinsic_fn(module, "llvm.floor.v16f32", _vf, [_vf]),
           "fma": _intrinsic_fn(module, "llvm.fma.v16f32", _vf, [_vf, _vf, _vf]),
           "rmax": _intrinsic_fn(module, "llvm.vector.reduce.fmax.v16f32", _f32, [_vf])}
    entry, body, done = fn.append_basic_block("entry"), fn.append_basic_block("group"), fn.append_basic_block("done")
    b = ir.IRBuilder(entry)
    qv = [[_widen(b, b.load(_address(b, q_ptr, ir.Constant(_i64, 2 * (g * dim + c * LANES)), _vh), align=2), half)
           for c in range(chunks)] for g in range(group)]
    acc = [[b.alloca(_vf) for _ in range(chunks)] for _ in range(group)]
    sums = [b.alloca(_vf) for _ in range(group)]
    tops = [b.alloca(_f32) for _ in range(group)]
    for g in range(group):
        for c in range(chunks):
            b.store(_splat(0.0), acc[g][c])
        b.store(_splat(0.0), sums[g])
        b.store(ir.Constant(_f32, float("-inf")), tops[g])
    b.cbranch(b.icmp_signed("<", lo, hi), body, done)

    b.position_at_end(body)
    j = b.phi(_i64)
    j.add_incoming(lo, entry)
    last = b.sub(hi, ir.Constant(_i64, 1))

    def row(base, row_bytes, key):
        """Key `key`'s row as fp32 vectors; the key is clamped to the range: a group's missing keys read the
        last one."""
        key = b.select(b.icmp_signed("<", key, hi), key, last)
        start = b.mul(key, row_bytes)
        return [_widen(b, b.load(_address(b, base, b.add(start, ir.Constant(_i64, 2 * c * LANES)), _vh), align=2),
                       half)
                for c in range(chunks)]

    # scores: per key and query row a vector of partial dot products, folded 16 keys into one vector
    stacks = [[] for _ in range(group)]  # (items' width, vector) pending folds, as a binary counter
    for jj in range(LANES):
        kv = row(k_ptr, k_row, b.add(j, ir.Constant(_i64, jj)))
        for g in range(group):
            part = b.fmul(qv[g][0], kv[0])
            for c in range(1, chunks):
                part = b.call(fns["fma"], [qv[g][c], kv[c], part])
            width, vec = LANES, part
            while stacks[g] and stacks[g][-1][0] == width:
                vec = _fold(b, stacks[g].pop()[1], vec, width // 2)
                width //= 2
            stacks[g].append((width, vec))
    vi64 = ir.VectorType(_i64, LANES)
    valid = b.icmp_signed("<", b.add(_broadcast(b, j, vi64), ir.Constant(vi64, list(range(LANES)))),
                          _broadcast(b, hi, vi64))
    splat_scale = _broadcast(b, scale)
    probs = []
    for g in range(group):
        ((_, scores),) = stacks[g]
        scores = b.select(valid, b.fmul(scores, splat_scale), _splat(float("-inf")))
        top_before = b.load(tops[g])
        top = b.call(_intrinsic_fn(module, "llvm.maxnum.f32", _f32, [_f32, _f32]),
                     [top_before, b.call(fns["rmax"], [scores], fastmath=("nnan",))])
        b.store(top, tops[g])
        top_v = _broadcast(b, top)
        prob = _exp(b, fns, b.fsub(scores, top_v))
        # the running sums were taken against the old max: rescaled by exp(old - new), 0 for the first group
        alpha = _exp(b, fns, b.fsub(_broadcast(b, top_before), top_v))
        b.store(b.call(fns["fma"], [b.load(sums[g]), alpha, prob]), sums[g])
        for c in range(chunks):
            b.store(b.fmul(b.load(acc[g][c]), alpha), acc[g][c])
        probs.append(prob)
    # values: the 16 keys' rows, each weighted by its probability for each query row
    outs = [[b.load(acc[g][c]) for c in range(chunks)] for g in range(group)]
    for jj in range(LANES):
        vv = row(v_ptr, v_row, b.add(j, ir.Constant(_i64, jj)))
        for g in range(group):
            weight = b.shuffle_vector(probs[g], probs[g], ir.Constant(_vi, [jj] * LANES))
            outs[g] = [b.call(fns["fma"], [weight, vv[c], outs[g][c]]) for c in range(chunks)]
    for g in range(group):
        for c in range(chunks):
            b.store(outs[g][c], acc[g][c])
    j_next = b.add(j, ir.Constant(_i64, LANES))
    j.add_incoming(j_next, b.block)
    b.cbranch(b.icmp_signed("<", j_next, hi), body, done)

    b.position_at_end(done)
    for g in range(group):
        for c in range(chunks):
            b.store(b.load(acc[g][c]), _address(b, out_ptr, ir.Constant(_i64, 4 * (g * (dim + 2) + c * LANES)), _vf),
                    align=4)
        b.store(b.load(tops[g]), _address(b, out_ptr, ir.Constant(_i64, 4 * (g * (dim + 2) + dim)), _f32))
        total = b.call(_intrinsic_fn(module, "llvm.vector.reduce.fadd.v16f32", _f32, [_f32, _vf]),
                       [ir.Constant(_f32, 0.0), b.load(sums[g])], fastmath=("reassoc",))
        b.store(total, _address(b, out_ptr, ir.Constant(_i64, 4 * (g * (dim + 2) + dim + 1)), _f32))
    b.ret_void()
    return fn


@intrinsic(prefer_literal=True)
def _attend_task(typingctx, q, k, v, strides, head, lo, hi, scale, out, group, dim, half):
    """`_task_function` for KV head `head` over keys lo..hi: q, k, v the addresses of 16-bit float bits, q [Hkv,
    G, D] C-contiguous, k and v [Hkv, capacity, D] with rows contiguous and `strides` = (k's head, k's row,
    v's head, v's row) in elements; out fp32 [G, D + 2] (C-contiguous); `group` and `dim` are G and D as
    compile-time constants, `half` 1 for fp16 bits (0: bf16)."""
    if not all(isinstance(a, types.IntegerLiteral) for a in (group, dim, half)):
        return None
    g_count, d_count, is_half = group.literal_value, dim.literal_value, bool(half.literal_value)

    def codegen(context, builder, signature, args):
        out_arr = context.make_array(signature.args[8])(context, builder, args[8])
        fn = _task_function(builder.module, g_count, d_count, is_half)
        k_head, k_row, v_head, v_row = (builder.mul(x, ir.Constant(_i64, 2))
                                        for x in cgutils.unpack_tuple(builder, args[3]))
        i8p = ir.PointerType(ir.IntType(8))
        q_at = builder.inttoptr(builder.add(args[0], builder.mul(args[4], ir.Constant(_i64, 2 * g_count * d_count))),
                                ir.PointerType(_i16))
        k_at = builder.inttoptr(builder.add(args[1], builder.mul(args[4], k_head)), i8p)
        v_at = builder.inttoptr(builder.add(args[2], builder.mul(args[4], v_head)), i8p)
        builder.call(fn, [q_at, k_at, v_at, k_row, v_row, args[5], args[6],
                          builder.fptrunc(args[7], _f32) if args[7].type != _f32 else args[7],
                          builder.bitcast(out_arr.data, ir.PointerType(_f32))])
        return context.get_dummy_value()

    return types.none(q, k, v, strides, head, lo, hi, scale, out, group, dim, half), codegen


@njit(cache=True, nogil=True, error_model="numpy")
def merge(partial, out, splits):
    """out [Hkv, G, D] = the tasks' partial results [Hkv * splits, G, D + 2] (unnormalised sums, max score, sum
    of exp) merged by log-sum-exp, in the tasks' order."""
    kv_heads, G, D = out.shape
    for h in range(kv_heads):
        for g in range(G):
            top = -np.inf
            for part in range(splits):
                top = max(top, partial[h * splits + part, g, D])
            total = np.float32(0.0)
            for d in range(D):
                out[h, g, d] = 0.0
            for part in range(splits):
                acc = partial[h * splits + part, g]
                if acc[D] > -np.inf:  # an empty range has no keys
                    w = np.float32(np.exp(acc[D] - top))
                    total += w * acc[D + 1]
                    for d in range(D):
                        out[h, g, d] += w * acc[d]
            for d in range(D):
                out[h, g, d] /= total


def _build(group: int, dim: int, half: bool):
    """The kernel for `group` query heads per KV head, head size `dim` (a multiple of 16), fp16 or bf16 bits."""
    G, D, H = group, dim, int(half)
    TAKEN_IN = cpu_jit.sources_digest(Path(__file__).parent.parent / "packed_gemv" / "numba_gemv.py")  # f32_pointer

    # addresses, not arrays: numba takes microseconds to unbox each array made for a call (a step's views of
    # the cache are); one signature, compiled (or loaded from numba's cache) when made
    @njit("void(int64, int64, int64, int64, UniTuple(int64, 4), int64, float64, int64, float32[:, :, ::1], int64)",
          parallel=True, cache=True, nogil=True, error_model="numpy")
    def attend(q, k, v, kv_heads, strides, length, scale, splits, partial, out_at):
        """q, k, v the addresses of 16-bit float bits (bf16 or fp16, as built): q [Hkv, G, D] C-contiguous, k, v
        [Hkv, capacity, D] with `strides` (k's head, k's row, v's head, v's row) in elements; out_at the
        address of out fp32 [Hkv, G, D] (C-contiguous); partial fp32 [Hkv * splits, G, D + 2] is scratch."""
        out = carray(f32_pointer(out_at + 0 * TAKEN_IN), (kv_heads, G, D))
        span = (length + splits - 1) // splits
        for task in prange(kv_heads * splits):
            lo = (task % splits) * span
            _attend_task(q, k, v, strides, task // splits, lo, min(length, lo + span), scale, partial[task], G, D, H)
        merge(partial, out, splits)

    return attend


_KERNELS: dict[tuple[int, int, bool], object] = {}


def kernel(group: int, dim: int, half: bool = False):
    """The compiled kernel for G = `group`, D = `dim`, fp16 (`half`) or bf16 rows (compiled once a process;
    numba's cache keeps it)."""
    if (group, dim, half) not in _KERNELS:
        _KERNELS[(group, dim, half)] = _build(group, dim, half)
    return _KERNELS[(group, dim, half)]
