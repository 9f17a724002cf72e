"""The CPU one-token matmuls over packed GGUF weights (numba, kernels/packed_gemv/: the fp32 kernel and the
integer one, whose input is rounded to 8 bits) against their float64 definitions, their prologues (RMSNorm,
SiLU), and the paths around them: `QuantLinear` taking them for one row, torch's int4 kernel when numba cannot
serve, numba's threads following torch's."""

import numpy as np
import pytest
import torch
from salachat.kernels import packed_gemv
from salachat.kernels.packed_gemv.reference import packed_gemv_q8_ref, packed_gemv_ref, quantized_activations

numba = pytest.importorskip("numba")
gguf = pytest.importorskip("gguf")


def _layer(qtype, n, k, seed, bias=False, huge_d=False):
    from salachat.engine.gguf_file import TensorInfo
    from salachat.engine.qlinear import QuantLinear

    rng = np.random.default_rng(seed)
    # rows of very different magnitudes, and each row's values spread so that the codes span their range
    w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.01, 3, (n, 1)).astype(np.float32)
    w[:, ::7] += 2.0  # groups whose Q4_1 minimum is far from zero
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    raw = gguf.quants.quantize(w, kind).copy()
    if huge_d:  # every other row's d near fp16's top: 16 d and -128 d overflow fp16, fp32 must not
        d = raw.reshape(n, k // 32, -1)[..., 0:2].copy().view(np.float16)
        d[::2] = (60000 * np.sign(d[::2].astype(np.float32))).astype(np.float16)
        raw.reshape(n, k // 32, -1)[..., 0:2] = d.view(np.uint8)
    layer = QuantLinear.from_gguf(torch.from_numpy(raw), TensorInfo("w", (n, k), kind, 0), bias=bias)
    if bias:
        layer.bias.copy_(torch.from_numpy(rng.standard_normal(n).astype(np.float32)))
    return layer


def _rel(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def _definition(layer, x):
    """What `packed_gemv.matvec` computes for this layer here: the product of the rounded input where the
    integer kernel serves (AVX2), else of x itself."""
    return (packed_gemv_q8_ref if packed_gemv.rounds_activations(layer) else packed_gemv_ref)(layer, x)


def _modules():
    from salachat.kernels.packed_gemv import numba_gemv, numba_gemv_q8

    return [(numba_gemv, packed_gemv_ref)] + ([(numba_gemv_q8, packed_gemv_q8_ref)] if numba_gemv_q8.available() else [])


def _call(module, layer, x, mode=0, weight=None, eps=0.0, block=None):
    from salachat.engine import qlinear

    pack1 = layer.packed1 if layer.n_packs > 1 else layer.packed0
    y = torch.empty(layer.out_features)
    x = x.reshape(-1).float().contiguous()
    module.kernel(layer.qtype, block or qlinear.PACK_BLOCK)(
        *(t.data_ptr() for t in (layer.packed0, pack1, layer.gguf_numbers, x, y)), layer.in_features,
        layer.out_features, mode, 0 if weight is None else weight.data_ptr(), eps)
    return y


# one block of 64 rows and one group of 32 inputs, several of each, K past a power of two; every kind
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("n, k", [(64, 32), (192, 96), (448, 160), (128, 576)])
def test_kernels_match_their_float64_definitions(qtype, n, k):
    layer = _layer(qtype, n, k, seed=n + k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)) * 3
    exact = packed_gemv_ref(layer, x[0])
    torch_int4 = layer._packed_mm(x.bfloat16()).float()[0]  # the kernel they replace: bf16 in and out
    for module, definition in _modules():
        got = _call(module, layer, x)
        assert _rel(got, definition(layer, x[0])) < 2e-6, (module.__name__, _rel(got, definition(layer, x[0])))
    fp32 = _call(_modules()[0][0], layer, x)
    assert _rel(fp32, exact) < _rel(torch_int4, exact) / 100
    got = packed_gemv.matvec(layer, x)  # the product's path: whichever serves here
    assert got is not None and got.shape == (1, n) and got.dtype == torch.float32
    assert _rel(got[0], _definition(layer, x[0])) < 2e-6


def test_activations_round_as_their_definition():
    """The integer kernel's rounding of x: per group of 32, rint(x * 127 / max|x|), ties to even, a group of
    zeros to zeros; the same bits as `quantized_activations`."""
    from salachat.kernels.packed_gemv import numba_gemv_q8

    x = torch.randn(7 * 32, generator=torch.Generator().manual_seed(11)) * torch.logspace(-6, 6, 7).repeat_interleave(32)
    x[32:64] = 0.0  # a group of zeros
    x[64:96] = torch.arange(32) - 15.5  # with max|x| = 127 the factor is 1: every x.5 is a tie
    x[64] = 127.0
    q, s, total = np.empty(x.numel(), np.int8), np.empty(7, np.float32), np.empty(7, np.int32)
    numba_gemv_q8.quantize(x.numpy(), q, s, total)
    want_q, want_s = quantized_activations(x)
    assert torch.equal(torch.from_numpy(q), want_q) and torch.equal(torch.from_numpy(s), want_s)
    assert torch.equal(torch.from_numpy(total), want_q.reshape(7, 32).sum(-1, dtype=torch.int32))
    assert (want_q[32:64] == 0).all() and (want_s[1] == 0)
    assert want_q.abs().max() == 127
    assert want_q[65:69].tolist() == [-14, -14, -12, -12]  # -14.5, -13.5, -12.5, -11.5: to even


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_the_prologues_are_the_unfused_steps(qtype):
    """A kernel's RMSNorm and SiLU prologues give the bits of the kernel fed the prologue's own result, and that
    result is the model's norm and SiLU in fp32 (to a last bit: the sum of squares is taken in float64)."""
    from salachat.kernels import rms_norm
    from salachat.kernels.packed_gemv.numba_gemv import prologue

    layer = _layer(qtype, 192, 96, seed=12)
    gen = torch.Generator().manual_seed(12)
    x, weight = torch.randn(96, generator=gen) * 4, torch.rand(96, generator=gen) + 0.5
    normed = torch.from_numpy(prologue(1, x.data_ptr(), 96, weight.data_ptr(), np.float32(1e-5)).copy())
    assert _rel(normed, rms_norm(x[None], weight, 1e-5)[0]) < 1e-6
    gate_up = torch.randn(192, generator=gen) * 3
    act = torch.from_numpy(prologue(2, gate_up.data_ptr(), 96, 0, np.float32(0.0)).copy())
    assert _rel(act, torch.nn.functional.silu(gate_up[:96]) * gate_up[96:]) < 1e-6
    for module, _ in _modules():
        assert torch.equal(_call(module, layer, x, mode=1, weight=weight, eps=1e-5), _call(module, layer, normed))
        assert torch.equal(_call(module, layer, gate_up, mode=2), _call(module, layer, act))


def test_one_row_with_a_prologue_takes_the_same_steps_without_numba(monkeypatch):
    """`QuantLinear.one_row(x, norm=..., silu_mul=True)`: the kernel's prologue where it serves, torch's norm
    and SiLU before torch's int4 kernel where it does not: the same product to bf16's precision."""
    from salachat.engine.models.llama import RMSNorm

    layer = _layer("Q4_1", 128, 64, seed=13)
    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=torch.Generator().manual_seed(13)) + 0.5)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(14))
    gate_up = torch.randn(1, 128, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        fused = layer.one_row(x, norm=norm), layer.one_row(gate_up, silu_mul=True)
        monkeypatch.setattr(packed_gemv, "matvec", lambda *a, **k: None)
        plain = layer.one_row(x, norm=norm), layer.one_row(gate_up, silu_mul=True)
        want = (packed_gemv_ref(layer, norm(x)[0]),
                packed_gemv_ref(layer, (torch.nn.functional.silu(gate_up[:, :64]) * gate_up[:, 64:])[0]))
    for f, p, w in zip(fused, plain, want):
        assert _rel(f[0], w) < 2e-2 and _rel(p.float()[0], w) < 2e-2


@pytest.mark.parametrize("block", [64, 32])
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_both_of_torchs_layouts_read_back_the_files_weights(qtype, block, monkeypatch):
    """torch packs 64 rows a block on an AVX-512 CPU and 32 on an AVX2 one; whichever this machine has, the
    packs' readers (`dequantized`, `rows`, the numba kernel) walk each layout to the weights gguf's own code
    dequantises."""
    from salachat.engine import qlinear

    monkeypatch.setattr(qlinear, "PACK_BLOCK", block)
    n, k = 192, 96
    rng = np.random.default_rng(block)
    w = rng.standard_normal((n, k)).astype(np.float32)
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    raw = gguf.quants.quantize(w, kind)
    exact = torch.from_numpy(gguf.quants.dequantize(raw, kind).astype(np.float32))
    layer = qlinear.QuantLinear.from_gguf(torch.from_numpy(raw), qlinear_info(n, k, kind))
    assert torch.equal(layer.dequantized(torch.float32), exact)
    index = torch.tensor([0, block // 2 - 1, block // 2, block - 1, block, n - 1])
    assert torch.equal(layer.rows(index), exact[index])
    x = torch.randn(k, generator=torch.Generator().manual_seed(1))
    for module, definition in _modules():
        assert _rel(_call(module, layer, x, block=block), definition(layer, x)) < 2e-6
    assert _rel(_call(_modules()[0][0], layer, x, block=block), (exact.double() @ x.double()).float()) < 2e-6


def test_the_packs_are_torchs_own_on_this_cpu():
    """The layout found at import is the one torch's kernel reads here: its product over our packs matches the
    file's weights to bf16's precision."""
    from salachat.engine import qlinear

    assert qlinear.PACK_BLOCK in (64, 32)
    q = torch.randint(0, 16, (256, 128), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(qlinear.packed_bytes(q, qlinear.PACK_BLOCK), torch._convert_weight_to_int4pack_for_cpu(q, 1))
    layer = _layer("Q4_1", 256, 128, seed=9)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(9))
    got = layer._packed_mm(x.bfloat16()).float()
    want = x.double() @ layer.dequantized(torch.float32).double().T
    assert _rel(got, want) < 2e-2


def qlinear_info(n, k, kind):
    from salachat.engine.gguf_file import TensorInfo

    return TensorInfo("w", (n, k), kind, 0)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_scales_near_fp16s_top_stay_exact(qtype):
    layer = _layer(qtype, 128, 64, seed=5, huge_d=True)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(2))
    assert packed_gemv_ref(layer, x[0]).abs().max() > 65504
    for module, definition in _modules():
        got = _call(module, layer, x)
        assert torch.isfinite(got).all() and _rel(got, definition(layer, x[0])) < 2e-6


def test_quant_linear_takes_the_kernel_for_one_row_and_adds_its_bias():
    layer = _layer("Q4_1", 192, 96, seed=3, bias=True)
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(4))
    want = _definition(layer, x[0]) + layer.bias
    assert torch.equal(layer(x), packed_gemv.matvec(layer, x) + layer.bias)
    assert _rel(layer(x)[0], want) < 2e-6
    assert torch.equal(layer(x.bfloat16()), packed_gemv.matvec(layer, x.bfloat16()).bfloat16() + layer.bias.bfloat16())
    # views of the layer's buffers are made once, and made again when the buffers are replaced
    for name, buffer in list(layer.named_buffers()):
        setattr(layer, name, buffer.clone() * (2 if name == "bias" else 1))
    assert _rel(layer(x)[0], _definition(layer, x[0]) + layer.bias) < 2e-6


def test_the_result_does_not_depend_on_the_thread_count():
    layer = _layer("Q8_0", 640, 128, seed=6)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(6))
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            torch.set_num_threads(threads)
            runs.append(packed_gemv.matvec(layer, x))
            assert numba.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert torch.equal(runs[0], runs[1])  # a task is a block of rows: no sum is split between threads


def test_without_numba_one_row_keeps_torchs_kernel_and_says_so_once(monkeypatch):
    monkeypatch.setattr(packed_gemv, "_LOADS", {})
    monkeypatch.setattr(packed_gemv, "_FAILED", [])

    def missing(qtype):
        raise ImportError("No module named 'numba'")

    monkeypatch.setattr(packed_gemv, "_load", missing)
    layer = _layer("Q4_0", 128, 64, seed=7)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(7))
    with pytest.warns(RuntimeWarning, match="numba packed matmul unavailable"):
        y = layer(x)
    assert y.dtype == torch.float32 and _rel(y[0], packed_gemv_ref(layer, x[0])) < 2e-2  # torch's bf16 kernel
    assert packed_gemv._FAILED and packed_gemv.matvec(layer, x) is None  # said once, then not asked again


def test_shapes_and_devices_it_does_not_serve_are_left_to_the_caller():
    layer = _layer("Q4_1", 64, 32, seed=8)
    assert packed_gemv.matvec(layer, torch.randn(2, 32)) is None  # two rows: torch's kernel
    assert packed_gemv.matvec(layer, torch.randn(1, 64)) is None  # not the layer's input size


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_rows_by_numba_are_torchs_bits(qtype, monkeypatch):
    """`QuantLinear.rows` (the embedding's lookup and the LM head's refinement) by numba once the kernels have
    loaded: the same bits as its torch definition, rows from every block and both nibbles, repeated and out of
    order; fp16 numbers near the top of their range included."""
    layer = _layer(qtype, 192, 160, seed=7, huge_d=qtype != "Q4_1")
    index = torch.tensor([0, 191, 31, 32, 33, 63, 64, 100, 100, 5, 150])
    assert packed_gemv.matvec(layer, torch.randn(1, 160)) is not None  # the kernels are loaded
    fast = packed_gemv.rows(layer, index)
    assert fast is not None and fast.dtype == torch.float32 and fast.shape == (11, 160)
    monkeypatch.setattr(packed_gemv, "rows", lambda layer, index: None)
    definition = layer.rows(index)  # torch's
    assert torch.equal(fast, definition)
    assert torch.equal(definition, layer.dequantized(torch.float32)[index])


@pytest.mark.parametrize("block", [64, 32])
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_the_prompts_weights_by_numba_are_torchs_bits(qtype, block, monkeypatch):
    """A prompt's dense matmul takes W^T from numba (`numba_gemv.dequant_kernel`): in fp32 and in bf16 the same
    bits as `QuantLinear.dequantized` (torch's element-wise ops), in both of torch's layouts, with fp16 numbers
    near the top of their range."""
    from salachat.engine import qlinear
    from salachat.kernels.packed_gemv import _buffers, numba_gemv

    monkeypatch.setattr(qlinear, "PACK_BLOCK", block)
    layer = _layer(qtype, 192, 160, seed=11, huge_d=qtype != "Q4_1")
    for dtype, bits in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16)):
        got = torch.empty(160, 192, dtype=dtype)
        numba_gemv.dequant_kernel(qtype, block, dtype == torch.bfloat16)(*_buffers(layer), got.data_ptr(), 160, 192)
        want = layer.dequantized(dtype).T.contiguous()
        assert torch.isfinite(want.float()).all() and (qtype == "Q4_1" or want.float().abs().max() > 60000)
        assert torch.equal(got.view(bits), want.view(bits))


def test_a_prompts_matmul_is_the_same_with_or_without_numbas_weights(monkeypatch):
    from salachat.engine import qlinear

    layer = _layer("Q8_0", 192, 160, seed=12, bias=True)
    x = torch.randn(40, 160, generator=torch.Generator().manual_seed(5))
    assert packed_gemv.matvec(layer, x[:1]) is not None  # the kernels are loaded
    assert packed_gemv.dequantized_t(layer, qlinear.PREFILL_DTYPE) is not None
    fast = layer(x)
    monkeypatch.setattr(packed_gemv, "dequantized_t", lambda layer, dtype: None)
    assert torch.equal(fast, layer(x))


def test_llvms_pages_go_back_once_the_loads_are_done_and_kernels_still_load_after(monkeypatch):
    """When the last background load is done, the read-only pages of LLVM's library go back to the system
    (`cpu_jit.release_compiler_pages`); the loaded kernels keep computing the same bits, and a kernel loaded
    afterwards reads back what it needs. Off Linux nothing is done."""
    import sys

    from salachat.engine import qlinear
    from salachat.kernels import cpu_jit
    from salachat.kernels.packed_gemv import _buffers, numba_gemv

    layer = _layer("Q4_0", 192, 96, seed=21)
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(21))
    before = packed_gemv.matvec(layer, x)
    assert before is not None  # loaded, through cpu_jit.submit

    def load_again():  # numba's cache (or its compiler) through LLVM, outside any background load
        numba_gemv._DEQUANT.pop(("Q4_0", qlinear.PACK_BLOCK, False), None)
        got = torch.empty(96, 192)
        numba_gemv.dequant_kernel("Q4_0", qlinear.PACK_BLOCK, False)(*_buffers(layer), got.data_ptr(), 96, 192)
        return got

    assert torch.equal(load_again(), layer.dequantized(torch.float32).T)
    resident = _library_resident_kib()
    released = cpu_jit.release_compiler_pages()  # 0 where the system cannot (not Linux, before 5.4)
    if released and resident:
        assert _library_resident_kib() < resident
    assert torch.equal(packed_gemv.matvec(layer, x), before)
    assert torch.equal(cpu_jit.submit(load_again).result(), layer.dequantized(torch.float32).T)
    if released and resident:  # released again at the load's end
        assert _library_resident_kib() < resident
    monkeypatch.setattr(sys, "platform", "darwin")
    assert cpu_jit.release_compiler_pages() == 0


def _library_resident_kib() -> int:
    """Resident KiB of llvmlite's library mappings in this process (0 where /proc is not there)."""
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return 0
    total, inside = 0, False
    for line in lines:
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            inside = len(fields) > 5 and fields[5].endswith("libllvmlite.so")
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total
