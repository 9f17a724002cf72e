"""The Triton top-k of block-selection keys against `_top_blocks` (torch.topk), its reference: on the CPU through
TRITON_INTERPRET=1 with a small ROW, so that rows cross tile edges; on the GPU (-m gpu) at a 1M-token context."""

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and not under TRITON_INTERPRET=1", allow_module_level=True)
from salachat.kernels.sparse import triton_select
from salachat.kernels.sparse.triton_select import TOPK_TILE, _top_blocks
from salachat.kernels.sparse.triton_topk import _grouping, pack_keys, top_blocks_triton


def _mixed_scores(shape: tuple, width: int, seed: int) -> torch.Tensor:
    """Scores as the scorers see them, and worse: negatives, zeros of both signs, exact ties between blocks,
    forced blocks (+inf) and blocks past the query (-inf), both in runs and scattered."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(*shape, width, generator=gen)
    kind = torch.randint(0, 8, scores.shape, generator=gen)
    scores = torch.where(kind == 0, (scores * 2).round() / 2, scores)  # a few values shared by many blocks
    scores = torch.where(kind == 1, 0.0, torch.where(kind == 2, -0.0, scores))
    scores = torch.where(kind == 3, float("-inf"), torch.where(kind == 4, float("inf"), scores))
    scores[..., :1] = float("inf")
    scores[..., width - width // 4 :] = float("-inf")
    return scores


# (columns, k, ROW): one round narrower than a program's row and exactly as wide; two rounds, with a last tile
# narrower than k; k = 1, k = the row, k = the width
@pytest.mark.parametrize("width, k, row", [
    (50, 7, 64), (64, 5, 64), (64, 64, 64), (37, 37, 64), (300, 1, 64), (300, 16, 64), (129, 20, 64),
    (100, 64, 64), (1000, 96, 8192),
], ids=["narrower", "exactly-row", "k-is-row", "k-is-width", "k-1-two-rounds", "two-rounds", "short-last-tile",
        "k-is-row-two-rounds", "default-row"])
def test_triton_top_k_by_rows_chooses_the_blocks_torch_topk_chooses(width, k, row):
    keys = pack_keys(_mixed_scores((2, 3), width, seed=width + k))
    got = top_blocks_triton(keys, k, row=row, group=0)
    assert got.dtype == torch.int32 and got.shape == (2, 3, k)
    assert torch.equal(got.long(), _top_blocks(keys, k, 0))
    assert bool((got[..., 1:] > got[..., :-1]).all())  # ascending, each block once


# (columns, k, columns a group): exactly k groups, a last group narrower than the others, k = 1, k = half
# the row (every group chosen), many groups; the default grouping of a few wide rows
@pytest.mark.parametrize("width, k, group", [
    (50, 7, 2), (56, 7, 8), (129, 20, 4), (300, 1, 2), (200, 100, 2), (1000, 96, 8), (5000, 96, None),
], ids=["pairs", "exactly-k-groups", "short-last-group", "k-1", "every-group", "many-groups", "default"])
def test_triton_top_k_by_groups_chooses_the_blocks_torch_topk_chooses(width, k, group):
    """The k groups with the largest maxima hold the k largest keys: the same blocks as over the whole row."""
    keys = pack_keys(_mixed_scores((2, 2), width, seed=width + k))
    assert _grouping(width, k, group) is not None
    got = top_blocks_triton(keys, k, group=group)
    assert got.dtype == torch.int32 and torch.equal(got.long(), _top_blocks(keys, k, 0))


@pytest.mark.parametrize("score", [0.0, float("-inf"), float("inf"), -3.5], ids=str)
def test_triton_top_k_of_equal_scores_takes_the_lowest_blocks(score):
    """Every score tied bit for bit: only the key's low word (the block) decides, also across tiles."""
    keys = pack_keys(torch.full((2, 2, 300), score))
    lowest = torch.arange(20, dtype=torch.int32).expand(2, 2, 20)
    assert torch.equal(top_blocks_triton(keys, 20, row=64, group=0), lowest)
    assert torch.equal(top_blocks_triton(keys, 20, group=4), lowest)


@pytest.mark.parametrize("group", [0, 4])
def test_triton_top_k_of_one_decoded_query(group):
    keys = pack_keys(_mixed_scores((2, 1), 333, seed=3))
    assert torch.equal(top_blocks_triton(keys, 9, row=128, group=group).long(), _top_blocks(keys, 9, 0))


@pytest.mark.parametrize("group", [0, 2])
def test_triton_top_k_reads_a_strided_view(group):
    keys = pack_keys(_mixed_scores((4, 5), 90, seed=4)).transpose(0, 1)
    assert torch.equal(top_blocks_triton(keys, 6, row=32, group=group).long(), _top_blocks(keys, 6, 0))


def test_triton_top_k_refuses_what_it_cannot_choose():
    keys = pack_keys(torch.zeros(1, 100))
    for k in (0, 101):
        with pytest.raises(ValueError, match="k <= width"):
            top_blocks_triton(keys, k, row=64)
    with pytest.raises(ValueError, match="k <= width"):  # by rows, a second round wider than a program takes
        top_blocks_triton(pack_keys(torch.zeros(1, 40000)), 64, row=64, group=0)
    with pytest.raises(ValueError, match="k <= width"):  # by groups, fewer groups than k
        top_blocks_triton(keys, 60, group=2)


def test_a_triton_top_k_that_fails_to_build_leaves_torch_topk_choosing(monkeypatch):
    """A compiler failure on some GPU: one warning, torch.topk's (same) blocks, and torch.topk from then on;
    forced with topk_method="triton" the failure is raised."""
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(triton_select, "top_blocks_triton", broken)
    monkeypatch.setattr(triton_select, "_TOPK_FAILED", [])
    keys = pack_keys(_mixed_scores((2, 4), 200, seed=5))
    with pytest.warns(RuntimeWarning, match="torch.topk"):
        got = triton_select._chosen_blocks(keys, 11, "triton", False, 64, False)
    assert torch.equal(got, _top_blocks(keys, 11, 0))
    assert triton_select._TOPK_FAILED and "PassManager" in triton_select._TOPK_FAILED[0]
    assert torch.equal(triton_select._chosen_blocks(keys, 11, "triton", False, 64, False), got) and len(calls) == 1
    with pytest.raises(RuntimeError, match="PassManager"):
        triton_select._chosen_blocks(keys, 11, "triton", True, 64, False)


def _selection_keys(heads: int, rows: int, width: int, device: str = "cuda") -> torch.Tensor:
    """Keys of the last `rows` queries of a context of `width` 64-token blocks, as the scorers write them:
    bf16-rounded scores (many exact ties), block 0 and the 32 blocks before the query's forced, later -inf."""
    gen = torch.Generator(device=device).manual_seed(rows + width)
    scores = torch.rand(heads, rows, width, device=device, generator=gen).bfloat16().float()
    block = torch.arange(width, device=device)
    qb = (torch.arange(64 * width - rows, 64 * width, device=device) // 64)[:, None]
    forced = (block == 0) | ((block >= qb - 32) & (block <= qb))
    return pack_keys(torch.where(forced, float("inf"), torch.where(block <= qb, scores, float("-inf"))))


@pytest.mark.gpu
@pytest.mark.parametrize("rows, width", [(4096, 16384), (1, 16384), (3000, 16384 + 37), (1, 16384 + 37),
                                         (2000, 6000), (5, 96)])
def test_triton_top_k_at_a_million_token_context_on_gpu(rows, width):
    """A prefill chunk's rows and one decoded query's at 16K blocks (two rounds), off tile edges, one round."""
    keys = _selection_keys(2, rows, width)
    k = min(96, width)
    got = top_blocks_triton(keys, k)
    plain = (2147483647 - (keys.topk(k, dim=-1).values & 0xFFFFFFFF)).sort(-1).values
    assert torch.equal(got.long(), plain)
    if width % TOPK_TILE == 0:  # as select_blocks_triton pads a row for torch.topk's two rounds
        assert torch.equal(got.long(), _top_blocks(keys, k, TOPK_TILE))


_COMPILE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import compile_for_gpu as gpu
from salachat.kernels.sparse import triton_topk
gpu.UNSPECIALISED.update({"n_rows", "width", "k"})
rows = ["KEYS", "OUT", "n_rows", "width", "k", "s_key", "s_out"]
groups = rows[:2] + rows[3:]
by_groups, by_rows = triton_topk._topk_groups_kernel, triton_topk._topk_rows_kernel
for name, kernel, args, out, constants, warps in [
    ("groups, 1M prefill", by_groups, groups, "*i32", dict(GROUP=8, GROUPS=2048, CHUNK=256, KPAD=128), 2),
    ("groups, 128K prefill", by_groups, groups, "*i32", dict(GROUP=4, GROUPS=512, CHUNK=512, KPAD=128), 1),
    ("groups, 1M decode", by_groups, groups, "*i32", dict(GROUP=8, GROUPS=2048, CHUNK=256, KPAD=128), 4),
    ("rows, round 1", by_rows, rows, "*i64", dict(ROWS=1, BLOCK=8192, IDS=False), 8),
    ("rows, decode", by_rows, rows, "*i32", dict(ROWS=1, BLOCK=2048, IDS=True), 4),
    ("rows, narrow", by_rows, rows, "*i32", dict(ROWS=8, BLOCK=256, IDS=True), 4),
]:
    gpu.POINTERS["OUT"] = out
    print(json.dumps({"kernel": name, **gpu.build(kernel, args, constants, warps, 1)}))
"""


def test_top_k_kernels_compile_for_hopper_without_spilling():
    """The launches that the H200 measurements chose, compiled for sm_90 by Triton and ptxas on this machine
    (as test_kernels_triton does for the scorers): none spills registers, none fails to build."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton has no CUDA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE, str(Path(__file__).parent)], env=env, capture_output=True,
                         text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    built = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(built) == 6 and all(kernel["stack"] == 0 for kernel in built), built
