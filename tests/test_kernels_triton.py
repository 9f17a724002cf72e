"""Every Triton kernel against its PyTorch reference: on the CPU through TRITON_INTERPRET=1 at small shapes
(fp32: the interpreter mishandles bf16), on the GPU (-m gpu) in bf16 at the 9B model's head shapes."""

import sys
from pathlib import Path

import pytest
import torch
from salachat.kernels import SparseParams, compress_keys
from salachat.kernels.lightning.reference import lightning_attention_ref
from salachat.kernels.sparse.reference import block_sparse_attention_ref, select_blocks_ref

from salachat import kernels

pytest.importorskip("triton")
if not torch.cuda.is_available():
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and not under TRITON_INTERPRET=1", allow_module_level=True)
from salachat.kernels.gemv.reference import gemv_ref
from salachat.kernels.gemv.triton import gemv_triton
from salachat.kernels.lightning.triton import lightning_attention_triton
from salachat.kernels.pointwise.reference import (
    add_rms_norm_ref,
    gated_rms_norm_ref,
    heads_gate_ref,
    norm_rope_ref,
    rms_norm_ref,
    rope_ref,
    silu_mul_ref,
)
from salachat.kernels.pointwise.triton import (
    add_rms_norm_triton,
    gated_rms_norm_triton,
    heads_gate_triton,
    norm_rope_triton,
    rms_norm_triton,
    rope_triton,
    silu_mul_triton,
)
from salachat.kernels.sparse.triton_attention import block_sparse_attention_triton, union_of_selections
from salachat.kernels.sparse.triton_select import flash_geometry, select_blocks_triton

SMALL = SparseParams(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, local_blocks=2, topk=3, dense_len=0)


def _sparse_inputs(h, hkv, length, t, d, device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(h, t, d, generator=gen, device=device).to(dtype)
    k = torch.randn(hkv, length, d, generator=gen, device=device).to(dtype)
    v = torch.randn(hkv, length, d, generator=gen, device=device).to(dtype)
    return q, k, v


# lengths cross chunk (16/64) edges; one token is decode; GQA groups 1, 2, 4; with and without a state
@pytest.mark.parametrize("h, hkv, t, d, with_state", [
    (2, 2, 1, 16, True), (2, 2, 15, 16, False), (4, 2, 17, 32, True), (2, 1, 64, 16, True),
    (4, 4, 65, 16, False), (4, 1, 130, 32, True),
])
def test_lightning_kernel_matches_reference(h, hkv, t, d, with_state):
    gen = torch.Generator().manual_seed(t * 7 + h)
    q, k, v = (torch.randn(n, t, d, generator=gen) for n in (h, hkv, hkv))
    log_decay = -torch.rand(h, generator=gen) * 0.7 - 1e-3
    state = torch.randn(h, d, d, generator=gen) if with_state else None
    out, new_state = lightning_attention_triton(q, k, v, log_decay, 0.3, state)
    ref_out, ref_state = lightning_attention_ref(q, k, v, log_decay, 0.3, state)
    assert out.dtype == torch.float32 and new_state.dtype == torch.float32
    assert torch.allclose(out, ref_out, atol=2e-5, rtol=1e-5)
    assert torch.allclose(new_state, ref_state, atol=2e-5, rtol=1e-5)
    if state is not None:  # the caller's state is an input, never overwritten
        assert not torch.equal(new_state, state)


@pytest.mark.parametrize("t", [1, 40])
def test_lightning_kernel_updating_its_state_in_place_gives_the_same_state(t):
    gen = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(4, t, 16, generator=gen) for _ in range(3))
    log_decay = -torch.rand(4, generator=gen) - 1e-3
    state = torch.randn(4, 16, 16, generator=gen)
    ref_out, ref_state = lightning_attention_ref(q, k, v, log_decay, 0.3, state)
    buffer = state.clone()
    out, new_state = lightning_attention_triton(q, k, v, log_decay, 0.3, buffer, update_state=True)
    assert new_state is buffer and not torch.equal(buffer, state)
    assert torch.allclose(out, ref_out, atol=2e-5, rtol=1e-5) and torch.allclose(buffer, ref_state, atol=2e-5, rtol=1e-5)


def test_lightning_kernel_reads_strided_heads_first_views():
    """The model hands in q.transpose(0, 1) of a [T, H, D] projection: no copy, same result."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 4, 16, generator=gen)
    q = k = v = x.transpose(0, 1)
    assert not q.is_contiguous()
    log_decay = torch.full((4,), -0.1)
    got, _ = lightning_attention_triton(q, k, v, log_decay, 0.5)
    want, _ = lightning_attention_ref(q.contiguous(), k.contiguous(), v.contiguous(), log_decay, 0.5)
    assert torch.allclose(got, want, atol=2e-5)


# positions before and after the first level-2 key (p = 31 at kernel 8), lengths off block edges, decode;
# GQA groups 1, 2, 3, 4, 7, 8, 16 (3 and 7 are padded to a power of two inside the kernels); the Triton top-k
# (the GPU's default) after either scorer, torch.topk (the fallback) after the flash scorer
@pytest.mark.parametrize("scorer, topk_method", [("flash", "triton"), ("tile", "triton"), ("flash", "topk")])
@pytest.mark.parametrize("h, hkv, length, t", [(4, 2, 300, 40), (8, 2, 200, 1), (2, 2, 150, 150), (16, 1, 333, 33),
                                               (4, 2, 20, 20), (4, 4, 97, 7), (9, 3, 300, 37), (7, 1, 260, 1),
                                               (3, 1, 500, 70), (14, 2, 700, 5)])
def test_block_selection_kernel_equals_reference(h, hkv, length, t, scorer, topk_method):
    q, k, _ = _sparse_inputs(h, hkv, length, t, 16, seed=length + t)
    k1 = compress_keys(k, SMALL.kernel_size, SMALL.kernel_stride)
    k2 = compress_keys(k, 4 * SMALL.kernel_size, 4 * SMALL.kernel_stride)
    got = select_blocks_triton(q, k1, k2, length - t, SMALL, 0.3, scorer=scorer, topk_method=topk_method)
    assert torch.equal(got, select_blocks_ref(q, k1, k2, length - t, SMALL, 0.3))


# the flash scorer carries a chunk shared by two blocks across tiles and splits: small tiles and several
# splits put those edges everywhere; geometries with no look-back, two chunks a block, and one it does not
# cover (kernel 3x the stride: the tile scorer takes it)
@pytest.mark.parametrize("params", [
    SMALL,
    SparseParams(block_size=16, kernel_size=4, kernel_stride=4, init_blocks=1, local_blocks=0, topk=3, dense_len=0),
    SparseParams(block_size=8, kernel_size=8, kernel_stride=4, init_blocks=2, local_blocks=1, topk=2, dense_len=0),
    SparseParams(block_size=16, kernel_size=12, kernel_stride=4, init_blocks=1, local_blocks=2, topk=3, dense_len=0),
])
@pytest.mark.parametrize("h, hkv, length, t, block_tile, block_splits", [
    (3, 1, 300, 40, 2, None), (9, 3, 333, 1, 2, 3), (7, 1, 161, 17, 1, None), (4, 2, 400, 30, 2, 4),
])
def test_block_selection_across_tile_and_split_edges(params, h, hkv, length, t, block_tile, block_splits):
    q, k, _ = _sparse_inputs(h, hkv, length, t, 16, seed=length + t)
    k1 = compress_keys(k, params.kernel_size, params.kernel_stride)
    k2 = compress_keys(k, 4 * params.kernel_size, 4 * params.kernel_stride)
    got = select_blocks_triton(q, k1, k2, length - t, params, 0.3, block_tile=block_tile, block_splits=block_splits,
                               topk_method="triton")
    assert torch.equal(got, select_blocks_ref(q, k1, k2, length - t, params, 0.3))


# a context long enough that most tiles of keys are seen whole by every query of a tile: the scorer's and the
# LSE kernel's unmasked interior tiles beside their masked edge tiles, at prefill, at decode (whose LSE is split
# over programs, some with interior tiles and some without) and with a row of blocks split over programs
@pytest.mark.parametrize("t, block_splits", [(24, None), (1, None), (5, 3), (70, None)])
def test_block_selection_over_the_interior_tiles_of_a_long_context(t, block_splits):
    q, k, _ = _sparse_inputs(4, 2, 2200, t, 16, seed=t)
    k1, k2 = compress_keys(k, 8, 4), compress_keys(k, 32, 16)
    got = select_blocks_triton(q, k1, k2, 2200 - t, SMALL, 0.3, block_splits=block_splits, topk_method="triton")
    assert torch.equal(got, select_blocks_ref(q, k1, k2, 2200 - t, SMALL, 0.3))


def test_flash_scorer_applies_to_the_geometries_it_covers():
    assert flash_geometry(SparseParams()) == (4, 1)  # MiniCPM-SALA: 64-token blocks, chunks of 32 every 16
    assert flash_geometry(SparseParams(block_size=16, kernel_size=12, kernel_stride=4)) is None
    with pytest.raises(ValueError, match="flash scorer"):
        q, k, _ = _sparse_inputs(4, 2, 100, 1, 16)
        p = SparseParams(block_size=16, kernel_size=12, kernel_stride=4, local_blocks=2, topk=3, dense_len=0)
        select_blocks_triton(q, compress_keys(k, 12, 4), compress_keys(k, 48, 16), 99, p, 0.3, scorer="flash")


def test_a_flash_scorer_that_fails_to_build_leaves_the_tile_scorer_reading(monkeypatch):
    """A compiler failure of the flash scorer on some GPU: one warning, the tile scorer's (same) selection,
    and the tile scorer from then on; forced with scorer="flash" the failure is raised."""
    from salachat.kernels.sparse import triton_select

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(triton_select, "_launch_flash", broken)
    monkeypatch.setattr(triton_select, "_FLASH_FAILED", [])
    q, k, _ = _sparse_inputs(4, 2, 200, 9, 16, seed=2)
    k1, k2 = compress_keys(k, 8, 4), compress_keys(k, 32, 16)
    with pytest.warns(RuntimeWarning, match="tile scorer"):
        got = select_blocks_triton(q, k1, k2, 191, SMALL, 0.3)
    assert torch.equal(got, select_blocks_ref(q, k1, k2, 191, SMALL, 0.3))
    assert triton_select._FLASH_FAILED and "PassManager" in triton_select._FLASH_FAILED[0]
    with pytest.raises(RuntimeError, match="PassManager"):
        select_blocks_triton(q, k1, k2, 191, SMALL, 0.3, scorer="flash")


def test_block_selection_kernel_breaks_ties_toward_the_lower_block_like_the_reference():
    """Identical keys give identical block scores: the tie-break decides everything. Small integers and a
    power-of-two scale make every dot product exact, so the scores tie bit for bit in any summation order."""
    q = torch.randint(-2, 3, (4, 5, 16), generator=torch.Generator().manual_seed(9)).float()
    k = torch.ones(2, 400, 16)
    k1, k2 = compress_keys(k, 8, 4), compress_keys(k, 32, 16)
    got = select_blocks_triton(q, k1, k2, 395, SMALL, 0.25)
    assert torch.equal(got, select_blocks_ref(q, k1, k2, 395, SMALL, 0.25))
    assert got[0, 0, 0].item() == 0 and got[0, 0, 1].item() == 1  # block 0 forced, then the lowest ids
    assert torch.equal(select_blocks_triton(q, k1, k2, 395, SMALL, 0.25, topk_method="triton"), got)


def test_block_selection_kernel_splits_long_query_runs_into_tiles():
    q, k, _ = _sparse_inputs(4, 2, 260, 100, 16, seed=4)
    k1, k2 = compress_keys(k, 8, 4), compress_keys(k, 32, 16)
    tiled = select_blocks_triton(q, k1, k2, 160, SMALL, 0.3, query_tile=32)
    assert torch.equal(tiled, select_blocks_ref(q, k1, k2, 160, SMALL, 0.3))
    assert torch.equal(select_blocks_triton(q, k1, k2, 160, SMALL, 0.3, query_tile=32, topk_method="triton"), tiled)


@pytest.mark.parametrize("topk_method", ["topk", "triton"])
@pytest.mark.parametrize("length, t", [(333, 33), (333, 1), (401, 1), (290, 290)])
def test_block_selection_in_two_rounds_of_top_k_is_the_same_selection(length, t, topk_method):
    """Long rows take the best of each tile of blocks, then the best of those; the last tile is padded for
    torch.topk, and narrower than the others for the Triton kernel."""
    q, k, _ = _sparse_inputs(4, 2, length, t, 16, seed=length)
    k1, k2 = compress_keys(k, 8, 4), compress_keys(k, 32, 16)
    want = select_blocks_ref(q, k1, k2, length - t, SMALL, 0.3)
    assert torch.equal(select_blocks_triton(q, k1, k2, length - t, SMALL, 0.3, topk_tile=8,
                                            topk_method=topk_method), want)
    # every score tied bit for bit (as in the tie test above): the lowest ids must win across tiles too
    q = torch.randint(-2, 3, (4, t, 16), generator=torch.Generator().manual_seed(length)).float()
    ones = torch.ones(2, length, 16)
    o1, o2 = compress_keys(ones, 8, 4), compress_keys(ones, 32, 16)
    assert torch.equal(select_blocks_triton(q, o1, o2, length - t, SMALL, 0.25, topk_tile=8, topk_method=topk_method),
                       select_blocks_ref(q, o1, o2, length - t, SMALL, 0.25))


def test_top_blocks_by_tiles_of_top_k_and_by_a_whole_sort_are_the_same_set():
    from salachat.kernels.sparse.triton_select import _top_blocks

    gen = torch.Generator().manual_seed(5)
    score_bits = torch.randint(-(2**31), 2**31 - 1, (3, 2, 4096), generator=gen)  # ties between blocks too
    score_bits[0, 0, :2048] = 7
    keys = score_bits * 4294967296 + (2147483647 - torch.arange(4096))  # as the score kernels pack them
    row = keys[0, 0].tolist()
    plain = sorted(2147483647 - (key & 0xFFFFFFFF) for key in sorted(row, reverse=True)[:96])
    for got in (_top_blocks(keys, 96, 0), _top_blocks(keys, 96, 1024), _top_blocks(keys, 96, 0, "sort")):
        assert got.shape == (3, 2, 96) and got[0, 0].tolist() == plain
        assert torch.equal(got, _top_blocks(keys, 96, 0))


def test_union_of_selections_lists_each_block_once_with_the_queries_that_chose_it():
    idx = torch.tensor([[[0, 3, -1], [0, 2, 3], [5, -1, -1]]], dtype=torch.int32)  # 1 group, 3 queries
    union, bits, count = union_of_selections(idx, 2)
    assert count.tolist() == [[3, 1]]
    assert union[0, 0, :3].tolist() == [0, 2, 3] and union[0, 1, 0].item() == 5
    assert bits[0, 0, :3].tolist() == [0b11, 0b10, 0b11] and bits[0, 1, 0].item() == 0b01


def _random_selections(kv, t, k, n_blocks, seed, device="cpu"):
    """Ascending distinct block ids a row, -1 past a random count (as early queries have), int32."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.full((kv, t, k), -1, dtype=torch.int32)
    for g in range(kv):
        for q in range(t):
            n = int(torch.randint(1, k + 1, (), generator=gen))
            idx[g, q, :n] = torch.randperm(n_blocks, generator=gen)[:n].sort().values.int()
    return idx.to(device)


# tiles of 2-16 queries, the last one short (t not a multiple), few blocks (many shared) and many
@pytest.mark.parametrize("kv, t, k, bq, n_blocks", [(2, 37, 7, 4, 30), (1, 16, 5, 16, 200), (3, 9, 3, 2, 8),
                                                    (2, 65, 96, 4, 3000), (1, 41, 12, 8, 20)])
def test_union_kernel_builds_the_same_union_bits_and_counts_as_torch(kv, t, k, bq, n_blocks):
    idx = _random_selections(kv, t, k, n_blocks, seed=t * k)
    want = union_of_selections(idx, bq, "torch")
    got = union_of_selections(idx, bq, "triton")
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("h, hkv, length, t, d", [(4, 2, 300, 40, 16), (8, 2, 200, 1, 32), (2, 2, 150, 150, 16),
                                                  (16, 1, 333, 33, 16), (16, 1, 333, 1, 16), (16, 1, 40, 1, 16),
                                                  (4, 4, 97, 7, 16), (9, 3, 200, 20, 16), (9, 3, 300, 1, 16),
                                                  (7, 1, 260, 21, 16), (7, 1, 260, 1, 16)])
def test_block_sparse_attention_kernel_matches_reference(h, hkv, length, t, d):
    q, k, v = _sparse_inputs(h, hkv, length, t, d, seed=length * t)
    k1, k2 = compress_keys(k, 8, 4), compress_keys(k, 32, 16)
    idx = select_blocks_ref(q, k1, k2, length - t, SMALL, 0.3)
    got = block_sparse_attention_triton(q, k, v, idx, length - t, 16, 0.3)
    assert torch.allclose(got, block_sparse_attention_ref(q, k, v, idx, length - t, 16, 0.3), atol=1e-5)


@pytest.mark.parametrize("splits", [2, 5])
def test_block_sparse_attention_kernel_split_over_programs_merges_to_the_same_result(splits):
    """Decode splits a tile's blocks over programs and merges the partial softmaxes by log-sum-exp."""
    q, k, v = _sparse_inputs(8, 2, 300, 3, 16, seed=splits)
    k1, k2 = compress_keys(k, 8, 4), compress_keys(k, 32, 16)
    idx = select_blocks_ref(q, k1, k2, 297, SMALL, 0.3)
    got = block_sparse_attention_triton(q, k, v, idx, 297, 16, 0.3, splits=splits)
    assert torch.allclose(got, block_sparse_attention_ref(q, k, v, idx, 297, 16, 0.3), atol=1e-5)


def test_block_sparse_attention_kernel_over_a_compact_buffer():
    q, k, v = _sparse_inputs(4, 2, 100, 20, 16, seed=5)
    idx = torch.full((2, 20, 3), -1, dtype=torch.int32)
    idx[0, :, 0], idx[0, :, 1], idx[0, 10:, 2], idx[1, :, 0], idx[1, :, 1] = 0, 5, 6, 2, 6
    origin = torch.tensor([6, 0, 2, 5])
    gather = torch.cat([torch.arange(b * 16, b * 16 + 16).clamp(max=99) for b in origin.tolist()])
    where = {b: c for c, b in enumerate(origin.tolist())}
    cidx = idx.clone().apply_(lambda b: where[b] if b >= 0 else -1)
    got = block_sparse_attention_triton(q, k[:, gather], v[:, gather], cidx, 80, 16, 0.4, block_pos=origin)
    assert torch.allclose(got, block_sparse_attention_ref(q, k, v, idx, 80, 16, 0.4), atol=1e-5)


def test_tiny_sala_model_through_every_triton_kernel_equals_the_reference_path(tmp_path):
    """The whole model (8 layers: lightning, dense and InfLLM-V2 sparse) with kernels forced to Triton."""
    sys.path.insert(0, str(Path(__file__).parent))
    from sala_tiny import write_tiny_checkpoint
    from salachat.engine.loader import load_model

    tiny = load_model(str(write_tiny_checkpoint(tmp_path / "tiny")), device="cpu", dtype=torch.float32)
    ids = torch.randint(5, 320, (150,), generator=torch.Generator().manual_seed(0))
    with kernels.use("ref"):
        ref_cache = tiny.new_cache()
        ref = torch.cat([tiny.model(ids[:100], ref_cache), tiny.model(ids[100:], ref_cache)])
    with kernels.use("triton"):
        cache = tiny.new_cache()
        got = torch.cat([tiny.model(ids[:100], cache), tiny.model(ids[100:101], cache), tiny.model(ids[101:], cache)])
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 16), (37, 100)])
def test_rms_norm_kernel_matches_reference(shape):
    gen = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=gen) * 3
    weight = torch.rand(shape[-1], generator=gen) + 0.5
    got = rms_norm_triton(x, weight, 1e-6)
    assert got.shape == x.shape and torch.allclose(got, rms_norm_ref(x, weight, 1e-6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads, t, d", [(4, 37, 16), (2, 1, 32)])
def test_rope_kernel_matches_reference_on_a_heads_first_view(heads, t, d):
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(t, heads, d, generator=gen).transpose(0, 1)  # as the model makes it: a view, not contiguous
    angles = torch.arange(100, 100 + t).float()[:, None] * (1.0 / 10000 ** (torch.arange(0, d, 2) / d))[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    got = rope_triton(x, cos, sin)
    assert torch.allclose(got, rope_ref(x, cos, sin), rtol=1e-6, atol=1e-6)


def _fused_pointwise_inputs(t, hidden, heads, d, device="cpu", dtype=torch.float32):
    gen = torch.Generator(device=device).manual_seed(t * 31 + hidden)
    def randn(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * s).to(dtype)
    # a fused gate/up output with a row stride wider than its width (as a split of a wider projection makes)
    gate_up = randn(t, 2 * hidden + 8, s=4.0)[:, : 2 * hidden]
    h, y = randn(t, hidden, s=3.0), randn(t, hidden, s=20.0)
    weight = (torch.rand(hidden, generator=gen, device=device) + 0.5).to(dtype)
    out = torch.randn(heads, t, d, generator=gen, device=device) * 2  # the recurrence's fp32 output
    gate = randn(t, heads * d + 16, s=4.0)[:, 16:]  # the gate is a slice of the fused projection
    ow = (torch.rand(heads * d, generator=gen, device=device) + 0.5).to(dtype)
    return gate_up, h, y, weight, out, gate, ow


@pytest.mark.parametrize("t, hidden, heads, d", [(1, 64, 4, 16), (37, 100, 2, 32), (5, 16, 8, 8)])
def test_fused_pointwise_kernels_match_their_references(t, hidden, heads, d):
    gate_up, h, y, weight, out, gate, ow = _fused_pointwise_inputs(t, hidden, heads, d)
    got = silu_mul_triton(gate_up)
    assert got.shape == (t, hidden) and torch.allclose(got, silu_mul_ref(gate_up), rtol=1e-6, atol=1e-6)
    (got_h, got_x), (want_h, want_x) = add_rms_norm_triton(h, y, 0.3, weight, 1e-6), add_rms_norm_ref(h, y, 0.3, weight, 1e-6)
    assert torch.allclose(got_h, want_h, rtol=1e-6, atol=1e-6) and torch.allclose(got_x, want_x, rtol=1e-5, atol=1e-6)
    got = gated_rms_norm_triton(out, ow, 1e-6, gate)
    assert got.shape == (t, heads * d)
    assert torch.allclose(got, gated_rms_norm_ref(out, ow, 1e-6, gate), rtol=1e-5, atol=1e-6)
    got = heads_gate_triton(out, gate)  # token tiles of 32 (or 4096 // d): t = 37 crosses one
    assert got.shape == (t, heads * d) and torch.allclose(got, heads_gate_ref(out, gate), rtol=1e-6, atol=1e-6)
    qk = torch.randn(t, 2 * heads + 1, d, generator=torch.Generator().manual_seed(t))[:, 1 : heads + 1]  # a view
    angles = torch.arange(50, 50 + t).float()[:, None] * (1.0 / 10000 ** (torch.arange(0, d, 2) / d))[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    got = norm_rope_triton(qk, ow[:d], 1e-6, cos, sin)
    assert got.shape == (heads, t, d) and torch.allclose(got, norm_rope_ref(qk, ow[:d], 1e-6, cos, sin), rtol=1e-5,
                                                         atol=1e-6)
    # the dispatcher's own path off the GPU is the reference's ops
    assert torch.equal(kernels.silu_mul(gate_up, impl="ref"), silu_mul_ref(gate_up))
    assert all(torch.equal(a, b) for a, b in zip(kernels.add_rms_norm(h, y, 0.3, weight, 1e-6, impl="ref"),
                                                 (want_h, want_x)))


# rows and columns crossing the tiles' edges (masked) and whole tiles (unmasked); a row given as [1, K] and [K]
@pytest.mark.parametrize("n, k, bn, bk", [(64, 512, 8, 128), (70, 300, 8, 128), (16, 1024, 4, 256), (5, 96, 4, 64),
                                          (33, 64, None, None)])
def test_gemv_kernel_matches_reference(n, k, bn, bk):
    gen = torch.Generator().manual_seed(n + k)
    weight, x = torch.randn(n, k, generator=gen), torch.randn(1, k, generator=gen)
    got = gemv_triton(x, weight, bn, bk)
    assert got.shape == (1, n) and torch.allclose(got, gemv_ref(x, weight), rtol=1e-5, atol=1e-4)
    assert torch.allclose(gemv_triton(x[0], weight, bn, bk), got[0], rtol=1e-6, atol=1e-6)


def test_linear_dispatch_takes_one_row_of_a_plain_linear_and_leaves_the_rest(monkeypatch):
    calls = []
    monkeypatch.setitem(kernels._TRITON, "gemv", lambda x, w: calls.append(x.shape) or gemv_ref(x, w))
    layer = torch.nn.Linear(24, 10, bias=False)
    one, rows = torch.randn(1, 24), torch.randn(3, 24)
    assert torch.allclose(kernels.linear(layer, one, impl="triton"), layer(one), atol=1e-5) and calls == [(1, 24)]
    assert torch.equal(kernels.linear(layer, rows, impl="triton"), layer(rows))  # a prompt chunk: cuBLAS/torch
    biased = torch.nn.Linear(24, 10)
    assert torch.equal(kernels.linear(biased, one, impl="triton"), biased(one))
    assert torch.equal(kernels.linear(layer, one), layer(one))  # off the GPU, by default: the layer itself
    assert calls == [(1, 24)]


def test_a_gemv_that_fails_to_build_leaves_the_layer_computing(monkeypatch):
    def broken(x, w):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setitem(kernels._TRITON, "gemv", broken)
    monkeypatch.setattr(kernels, "_GEMV_FAILED", [])
    monkeypatch.setattr(kernels, "_pick", lambda op, tensor, impl: kernels._TRITON[op])  # as on CUDA
    layer, one = torch.nn.Linear(24, 10, bias=False), torch.randn(1, 24)
    with pytest.warns(RuntimeWarning, match="GEMV unavailable"):
        assert torch.equal(kernels.linear(layer, one), layer(one))
    assert kernels._GEMV_FAILED and torch.equal(kernels.linear(layer, one), layer(one))  # once, then quietly
    with pytest.raises(RuntimeError):
        kernels.linear(layer, one, impl="triton")  # forced: the failure is the answer


# ---- on the GPU, bf16, the 9B model's shapes ----

@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [(4096, 4096), (4608, 4096), (4096, 16384), (32768, 4096), (73448, 4096),
                                  (4100, 4000), (256, 4096)])
def test_gemv_kernel_bf16_on_gpu_within_a_rounding_of_fp32(n, k):
    """The sum is fp32 in another order than the reference's, so a result may round to the neighbouring bf16
    value; never further."""
    gen = torch.Generator(device="cuda").manual_seed(n)
    weight = torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, k, generator=gen, device="cuda", dtype=torch.bfloat16)
    got, exact = gemv_triton(x, weight).float(), x.float() @ weight.float().T
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs() + 1e-3  # + what fp32 sums in two orders may differ by
    assert ((got - exact).abs() <= ulp).all()
    assert (got == gemv_ref(x, weight).float()).float().mean().item() > 0.95


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 4096), (333, 4096), (333, 32, 128)])
def test_pointwise_kernels_bf16_on_gpu(shape):
    gen = torch.Generator(device="cuda").manual_seed(shape[0])
    x = torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16) * 2
    weight = (torch.rand(shape[-1], generator=gen, device="cuda") + 0.5).bfloat16()
    got, want = rms_norm_triton(x, weight, 1e-6).float(), rms_norm_ref(x, weight, 1e-6).float()
    assert (got - want).abs().max().item() <= 1e-2 * want.abs().max().item()  # within a bf16 rounding
    assert (got == want).float().mean().item() > 0.99
    if len(shape) == 3:
        heads_first = x.transpose(0, 1)
        angles = torch.arange(shape[0], device="cuda").float()[:, None] * torch.rand(64, device="cuda")[None, :]
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        got, want = rope_triton(heads_first, cos, sin).float(), rope_ref(heads_first, cos, sin).float()
        assert (got == want).float().mean().item() > 0.999 and torch.allclose(got, want, rtol=1e-2, atol=1e-2)

@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 333])
def test_fused_pointwise_kernels_bf16_on_gpu_give_torchs_bits(t):
    """The fused kernels round where torch's ops round and use its exp and division, so in bf16 at the 9B
    shapes they give the bits of the unfused ops (a bf16 rounding apart in rare cases at most)."""
    gate_up, h, y, weight, out, gate, ow = _fused_pointwise_inputs(t, 4096, 32, 128, "cuda", torch.bfloat16)

    def same(got, want):
        got, want = got.float(), want.float()
        assert got.shape == want.shape and (got == want).float().mean().item() > 0.999
        assert torch.allclose(got, want, rtol=1e-2, atol=1e-2)

    same(silu_mul_triton(gate_up), silu_mul_ref(gate_up))
    assert torch.equal(silu_mul_triton(gate_up), silu_mul_ref(gate_up)), "silu(gate) * up: not torch's bits"
    wide = _fused_pointwise_inputs(4 * t + 3, 16384, 32, 128, "cuda", torch.bfloat16)[0]  # the 9B MLP's width
    assert torch.equal(silu_mul_triton(wide), silu_mul_ref(wide)), "silu(gate) * up at 16384: not torch's bits"
    attended = out.bfloat16()  # a sparse layer's attention output, heads-first in the activations' dtype
    assert torch.equal(heads_gate_triton(attended, gate), heads_gate_ref(attended, gate)), "output gate: not torch's bits"
    (got_h, got_x), (want_h, want_x) = add_rms_norm_triton(h, y, 0.37, weight, 1e-6), add_rms_norm_ref(h, y, 0.37, weight, 1e-6)
    assert torch.equal(got_h, want_h), "h + y * scale: not torch's bits"
    same(got_x, want_x)
    same(gated_rms_norm_triton(out, ow, 1e-6, gate), gated_rms_norm_ref(out, ow, 1e-6, gate))
    qk = gate.view(t, 32, 128)  # a strided view, as the split of the fused projection gives
    angles = torch.arange(t, device="cuda").float()[:, None] * torch.rand(64, device="cuda")[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    same(norm_rope_triton(qk, ow[:128], 1e-6, cos, sin), norm_rope_ref(qk, ow[:128], 1e-6, cos, sin))


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 63, 4096 + 17])
def test_lightning_kernel_bf16_on_gpu(t):
    gen = torch.Generator(device="cuda").manual_seed(t)
    q, k, v = (torch.randn(32, t, 128, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.3 for _ in range(3))
    log_decay = -torch.tensor([2 ** (-8 * (i + 1) / 32) for i in range(32)], device="cuda")
    state = torch.randn(32, 128, 128, device="cuda") * 0.1
    out, new_state = lightning_attention_triton(q, k, v, log_decay, 128**-0.5, state)
    ref_out, ref_state = lightning_attention_ref(q, k, v, log_decay, 128**-0.5, state)
    scale_o, scale_s = ref_out.abs().max().item(), ref_state.abs().max().item()
    assert (out.float() - ref_out).abs().max().item() < 2e-2 * scale_o
    assert (new_state - ref_state).abs().max().item() < 1e-2 * scale_s


@pytest.mark.gpu
@pytest.mark.parametrize("length, t", [(20000, 1), (20000, 2048), (70000, 333), (200000, 1)])
def test_sparse_kernels_bf16_on_gpu_at_9b_shapes(length, t):
    p = SparseParams()  # MiniCPM-SALA's: block 64, kernel 32/16, top-64 + 32 local
    q, k, v = _sparse_inputs(32, 2, length, t, 128, device="cuda", dtype=torch.bfloat16, seed=t)
    k1, k2 = compress_keys(k, 32, 16), compress_keys(k, 128, 64)
    scale = 128**-0.5
    got = select_blocks_triton(q, k1, k2, length - t, p, scale)
    want = select_blocks_ref(q, k1, k2, length - t, p, scale)
    assert (got != want).float().mean().item() < 1e-3  # fp32 sums in another order: only near-ties may differ
    out = block_sparse_attention_triton(q, k, v, want, length - t, 64, scale)
    ref = block_sparse_attention_ref(q.float(), k.float(), v.float(), want, length - t, 64, scale)
    assert (out.float() - ref).abs().max().item() < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("h, hkv", [(2, 2), (9, 3), (8, 2), (14, 2), (32, 2)])  # groups 1, 3, 4, 7, 16
@pytest.mark.parametrize("length, t", [(20000 + 17, 1), (20000 + 17, 333), (70000 - 5, 2048 + 5), (200000 + 63, 1)])
def test_block_selection_scorers_bf16_on_gpu_any_group(h, hkv, length, t):
    """Both scorers against the fp32 reference at the 9B geometry, lengths off block, tile and split edges:
    only near-ties (fp32 sums in another order, exp2 on the GPU) may choose differently."""
    p = SparseParams()
    q, k, _ = _sparse_inputs(h, hkv, length, t, 128, device="cuda", dtype=torch.bfloat16, seed=h * t)
    k1, k2 = compress_keys(k, 32, 16), compress_keys(k, 128, 64)
    want = select_blocks_ref(q, k1, k2, length - t, p, 128**-0.5)
    for scorer in ("flash", "tile"):
        got = select_blocks_triton(q, k1, k2, length - t, p, 128**-0.5, scorer=scorer)
        assert got.shape == want.shape
        assert (got != want).float().mean().item() < 1e-3, scorer


@pytest.mark.gpu
@pytest.mark.parametrize("length, t", [(1000000 + 7, 1), (1000000 + 7, 300), (300000, 2048 + 5), (5000, 77)])
def test_block_selection_on_gpu_finds_its_top_k_in_triton_by_default(length, t):
    """On CUDA the Triton top-k is the default: the same blocks as torch.topk over the same scorer's keys
    (for torch.topk the rows are padded to whole tiles of 1024 blocks; padding columns are never chosen)."""
    from salachat.kernels.sparse import triton_select

    p = SparseParams()
    q, k, _ = _sparse_inputs(32, 2, length, t, 128, device="cuda", dtype=torch.bfloat16, seed=t)
    k1, k2 = compress_keys(k, 32, 16), compress_keys(k, 128, 64)
    got = select_blocks_triton(q, k1, k2, length - t, p, 128**-0.5)
    assert not triton_select._TOPK_FAILED
    assert torch.equal(got, select_blocks_triton(q, k1, k2, length - t, p, 128**-0.5, topk_method="topk"))
    assert torch.equal(got, select_blocks_triton(q, k1, k2, length - t, p, 128**-0.5, topk_method="triton"))


@pytest.mark.gpu
def test_flash_scorer_ties_break_to_the_lower_block_on_gpu():
    """All keys equal: every block scores the same bits, and the lowest ids must win, also across splits."""
    p = SparseParams()
    q = torch.randint(-2, 3, (14, 5, 128), generator=torch.Generator().manual_seed(1)).float().cuda().bfloat16()
    k = torch.ones(2, 30000, 128, device="cuda", dtype=torch.bfloat16)
    k1, k2 = compress_keys(k, 32, 16), compress_keys(k, 128, 64)
    want = select_blocks_ref(q, k1, k2, 29995, p, 0.0625)
    assert torch.equal(select_blocks_triton(q, k1, k2, 29995, p, 0.0625, scorer="flash"), want)
    assert torch.equal(select_blocks_triton(q[:, :1], k1, k2, 29995, p, 0.0625, scorer="flash", block_splits=7),
                       want[:, :1])


@pytest.mark.gpu
@pytest.mark.parametrize("kv, t, bq, n_blocks", [(2, 4097, 4, 16000), (2, 333, 4, 120), (3, 100, 8, 500),
                                                (1, 77, 16, 96)])
def test_union_kernel_on_gpu_builds_torchs_union(kv, t, bq, n_blocks):
    idx = _random_selections(kv, t, 96, n_blocks, seed=t, device="cuda")
    want = union_of_selections(idx, bq, "torch")
    assert all(torch.equal(a, b) for a, b in zip(union_of_selections(idx, bq), want, strict=True))
    from salachat.kernels.sparse import triton_attention

    assert not triton_attention._UNION_FAILED  # the default on CUDA, not the fallback


@pytest.mark.gpu
@pytest.mark.parametrize("h, hkv, t", [(2, 2, 300), (9, 3, 1), (9, 3, 257), (14, 2, 1), (14, 2, 100)])
def test_block_sparse_attention_bf16_on_gpu_any_group(h, hkv, t):
    p = SparseParams()
    length = 30000 + 7
    q, k, v = _sparse_inputs(h, hkv, length, t, 128, device="cuda", dtype=torch.bfloat16, seed=t + h)
    k1, k2 = compress_keys(k, 32, 16), compress_keys(k, 128, 64)
    idx = select_blocks_ref(q, k1, k2, length - t, p, 128**-0.5)
    out = block_sparse_attention_triton(q, k, v, idx, length - t, 64, 128**-0.5)
    ref = block_sparse_attention_ref(q.float(), k.float(), v.float(), idx, length - t, 64, 128**-0.5)
    assert (out.float() - ref).abs().max().item() < 2e-2


def test_sparse_kernels_compile_for_hopper_without_spilling():
    """The flash scorer (groups 16, 3, 7, 1; prefill and decode tiles) and the attention with a padded group,
    compiled for sm_90 by Triton and ptxas on this machine: no spilled registers, the key loads pipelined
    (asynchronous copies) and the prefill dots on wgmma. Catches a kernel that would not build on the GPU."""
    import json
    import os
    import subprocess

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton has no CUDA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(Path(__file__).parent / "compile_for_gpu.py")], env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    built = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(built) == 6
    for kernel in built:
        assert kernel["stack"] == 0 and kernel["async_loads"] > 0, kernel
        assert kernel["shared"] <= 232448, kernel  # an H100's or H200's shared memory a block: else OutOfResources
        if "rows 16" not in kernel["kernel"]:  # a 16-row decode tile is below wgmma's 64 rows
            assert kernel["wgmma"], kernel
