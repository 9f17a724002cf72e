"""The CPU one-token matmul over packed GGUF weights (numba, kernels/packed_gemv/) against its float64
definition, and the paths around it: `QuantLinear` taking it for one row, torch's int4 kernel when numba cannot
serve, numba's threads following torch's."""

import numpy as np
import pytest
import torch
from salachat.kernels import packed_gemv
from salachat.kernels.packed_gemv.reference import packed_gemv_ref

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


# one block of 64 rows and one group of 32 inputs, several of each, K past a power of two; every kind
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("n, k", [(64, 32), (192, 96), (448, 160), (128, 576)])
def test_kernel_matches_the_float64_definition(qtype, n, k):
    layer = _layer(qtype, n, k, seed=n + k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)) * 3
    got = packed_gemv.matvec(layer, x)
    want = packed_gemv_ref(layer, x[0])
    assert got is not None and got.shape == (1, n) and got.dtype == torch.float32
    assert _rel(got[0], want) < 2e-6, _rel(got[0], want)
    torch_int4 = layer._packed_mm(x.bfloat16()).float()[0]  # the kernel it replaces: bf16 in and out
    assert _rel(got[0], want) < _rel(torch_int4, want) / 100


@pytest.mark.parametrize("block", [64, 32])
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_both_of_torchs_layouts_read_back_the_files_weights(qtype, block, monkeypatch):
    """torch packs 64 rows a block on an AVX-512 CPU and 32 on an AVX2 one; whichever this machine has, the
    packs' readers (`dequantized`, `rows`, the numba kernel) walk each layout to the weights gguf's own code
    dequantises."""
    from salachat.engine import qlinear
    from salachat.kernels.packed_gemv.numba_gemv import kernel

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
    pack1 = layer.packed1.numpy() if layer.n_packs > 1 else layer.packed0.numpy()
    y = np.empty(n, np.float32)
    kernel(qtype, block)(layer.packed0.numpy(), pack1, layer.gguf_numbers.view(torch.int16).numpy().view(np.uint16),
                         x.numpy(), y)
    assert _rel(torch.from_numpy(y), (exact.double() @ x.double()).float()) < 2e-6


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
    got, want = packed_gemv.matvec(layer, x)[0], packed_gemv_ref(layer, x[0])
    assert torch.isfinite(got).all() and want.abs().max() > 65504
    assert _rel(got, want) < 2e-6


def test_quant_linear_takes_the_kernel_for_one_row_and_adds_its_bias():
    layer = _layer("Q4_1", 192, 96, seed=3, bias=True)
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(4))
    want = packed_gemv_ref(layer, x[0]) + layer.bias
    assert torch.equal(layer(x), packed_gemv.matvec(layer, x) + layer.bias)
    assert _rel(layer(x)[0], want) < 2e-6
    assert torch.equal(layer(x.bfloat16()), packed_gemv.matvec(layer, x.bfloat16()).bfloat16() + layer.bias.bfloat16())
    # views of the layer's buffers are made once, and made again when the buffers are replaced
    for name, buffer in list(layer.named_buffers()):
        setattr(layer, name, buffer.clone() * (2 if name == "bias" else 1))
    assert _rel(layer(x)[0], packed_gemv_ref(layer, x[0]) + layer.bias) < 2e-6


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
