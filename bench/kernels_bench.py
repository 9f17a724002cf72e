"""Kernel microbenchmarks at the 9B MiniCPM-SALA shapes, each against baselines timed in the same run.

Lightning (32 heads, d 128, bf16 in, fp32 state): our Triton kernel, the PyTorch reference, and
flash-linear-attention's chunk_simple_gla (prefill) / fused_recurrent_simple_gla (decode) when fla is
importable. Sparse (32 q heads, 2 KV heads, d 128, block 64, top-64 + 32 local): block selection + block-sparse
attention for a prefill chunk and for one decoded token at contexts 32K-1M, against dense flash attention
(PyTorch SDPA, the same dense path the engine uses below dense_len) over the whole context. With
--topk-contexts, the selection's top-k alone: the Triton kernel against torch.topk (the fallback).

    python bench/kernels_bench.py --out bench/results/kernels.json
    python bench/kernels_bench.py --topk-contexts 131072 1048576 --lightning-lengths 0 --sparse-contexts 0
    python bench/kernels_bench.py --select-against before.py --sparse-contexts 32768 262144 1048576 \
        --select-sweep 1048576 --lightning-lengths 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from salachat.kernels import SparseParams, compress_keys, dense_attention
from salachat.kernels.lightning.reference import lightning_attention_ref
from salachat.kernels.sparse.reference import block_sparse_attention_ref, select_blocks_ref

H, D, HKV_SPARSE = 32, 128, 2


def timed(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median milliseconds of fn() over `repeat` runs, CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def graphed(fn, calls: int = 20) -> float:
    """Median milliseconds of fn() replayed from a CUDA graph of `calls` calls: GPU time, no launch gaps."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return timed(graph.replay, repeat=10) / calls


def slopes() -> torch.Tensor:
    return -torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)], device="cuda")


def bench_lightning(lengths, sweep: bool) -> list[dict]:
    from salachat.kernels.lightning.triton import lightning_attention_triton

    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    except Exception as e:  # noqa: BLE001 - the baseline is optional; say why it is missing
        print(f"flash-linear-attention not importable ({e}); its columns stay empty")
        chunk_simple_gla = fused_recurrent_simple_gla = None
    rows = []
    g = slopes()
    for t in lengths:
        q, k, v = (torch.randn(H, t, D, device="cuda", dtype=torch.bfloat16) * 0.3 for _ in range(3))
        state = torch.zeros(H, D, D, device="cuda")
        row = {"op": "lightning", "tokens": t}
        configs = [(64, 32, 4, 3)]
        if sweep:
            configs = [(64, bv, w, s) for bv in (16, 32, 64) for w in (2, 4, 8) for s in (2, 3, 4)]
        best = None
        for c, bv, w, s in configs:
            try:
                ms = timed(lambda: lightning_attention_triton(q, k, v, g, D**-0.5, state, chunk=c, block_v=bv,
                                                              num_warps=w, num_stages=s))
            except Exception as e:  # noqa: BLE001 - a config can exceed shared memory; skip it
                print(f"  config C={c} BV={bv} warps={w} stages={s}: {type(e).__name__}")
                continue
            if sweep:
                print(f"  lightning T={t} C={c} BV={bv} warps={w} stages={s}: {ms:.3f} ms")
            if best is None or ms < best[0]:
                best = (ms, {"chunk": c, "block_v": bv, "num_warps": w, "num_stages": s})
        row["triton_ms"], row["triton_config"] = best
        row["reference_ms"] = timed(lambda: lightning_attention_ref(q, k, v, g, D**-0.5, state), repeat=3)
        if chunk_simple_gla is not None:
            qf, kf, vf = (x.transpose(0, 1)[None].contiguous() for x in (q, k, v))  # fla: [B, T, H, D]
            s0 = state[None]
            row["fla_chunk_simple_gla_ms"] = timed(lambda: chunk_simple_gla(
                qf, kf, vf, g_gamma=g, scale=D**-0.5, initial_state=s0, output_final_state=True))
        rows.append(row)
        print(row)
    # decode: one token from a state
    q1, k1, v1 = (torch.randn(H, 1, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    state = torch.randn(H, D, D, device="cuda")
    row = {"op": "lightning_decode", "tokens": 1,
           "triton_ms": timed(lambda: lightning_attention_triton(q1, k1, v1, g, D**-0.5, state), repeat=50),
           "reference_ms": timed(lambda: lightning_attention_ref(q1, k1, v1, g, D**-0.5, state), repeat=50)}
    if fused_recurrent_simple_gla is not None:
        qf, kf, vf = (x.transpose(0, 1)[None].contiguous() for x in (q1, k1, v1))
        row["fla_fused_recurrent_ms"] = timed(lambda: fused_recurrent_simple_gla(
            qf, kf, vf, g_gamma=g, scale=D**-0.5, initial_state=state[None], output_final_state=True), repeat=50)
    rows.append(row)
    print(row)
    return rows


def select_flop(t: int, length: int, p: SparseParams) -> float:
    """Matrix FLOP of the selection for t queries ending at `length`: every query head against every visible
    level-1 and level-2 compressed key (2 D FLOP each), the causal part of the chunk counted as half."""
    n1 = length / p.kernel_stride
    n2 = length / (4 * p.kernel_stride)
    keys = (n1 + n2) * (1 - 0.5 * t / length)
    return 2.0 * D * H * t * keys


def bench_sparse(contexts, chunk: int, with_reference: bool) -> list[dict]:
    from salachat.kernels.sparse.triton_attention import block_sparse_attention_triton
    from salachat.kernels.sparse.triton_select import select_blocks_triton

    p = SparseParams()
    scale = D**-0.5
    rows = []
    for length in contexts:
        k = torch.randn(HKV_SPARSE, length, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        k1, k2 = compress_keys(k, p.kernel_size, p.kernel_stride), compress_keys(k, 4 * p.kernel_size, 4 * p.kernel_stride)
        for t in (chunk, 1):
            q = torch.randn(H, t, D, device="cuda", dtype=torch.bfloat16)
            pos0 = length - t
            idx = select_blocks_triton(q, k1, k2, pos0, p, scale)
            reps = 3 if t > 1 else 20
            row = {"op": "sparse_prefill" if t > 1 else "sparse_decode", "context": length, "queries": t}
            for scorer in ("flash", "tile"):  # the flash scorer is the default; the tile scorer is the older one
                row[f"select_{scorer}_ms"] = timed(lambda: select_blocks_triton(q, k1, k2, pos0, p, scale, scorer=scorer),
                                                   repeat=reps)
            row["select_ms"] = row["select_flash_ms"]
            # the same selection with torch.topk finding the best blocks (the fallback, and the default before)
            row["select_torch_topk_ms"] = timed(
                lambda: select_blocks_triton(q, k1, k2, pos0, p, scale, topk_method="topk"), repeat=reps)
            row["select_tflops"] = select_flop(t, length, p) / row["select_ms"] / 1e9  # top-k time included
            row["attend_ms"] = timed(lambda: block_sparse_attention_triton(q, k, v, idx, pos0, 64, scale), repeat=reps)
            row["dense_sdpa_ms"] = timed(lambda: dense_attention(q, k, v, pos0, scale), repeat=reps)
            row["sparse_ms"] = row["select_ms"] + row["attend_ms"]
            row["speedup_vs_dense"] = row["dense_sdpa_ms"] / row["sparse_ms"]
            if with_reference and length <= 131072:
                row["reference_ms"] = timed(lambda: block_sparse_attention_ref(
                    q, k, v, select_blocks_ref(q, k1, k2, pos0, p, scale), pos0, 64, scale), repeat=1, warmup=0)
            rows.append(row)
            print(row)
        del k, v, k1, k2
        torch.cuda.empty_cache()
    return rows


def kernel_ms(fn) -> dict[str, float]:
    """GPU time of each kernel one call of fn launches, by kernel name (the profiler's)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / 1e3 for e in prof.key_averages() if e.device_time_total > 0}


def sweep_select(length: int, queries: int) -> list[dict]:
    """Flash scorer configurations for a chunk of queries at the end of a `length` context (each with the
    selection's kernels' GPU times), and the top-k alone."""
    from salachat.kernels.sparse.triton_select import _top_blocks, select_blocks_triton

    p, scale = SparseParams(), D**-0.5
    k = torch.randn(HKV_SPARSE, length, D, device="cuda", dtype=torch.bfloat16)
    k1, k2 = compress_keys(k, p.kernel_size, p.kernel_stride), compress_keys(k, 4 * p.kernel_size, 4 * p.kernel_stride)
    q = torch.randn(H, queries, D, device="cuda", dtype=torch.bfloat16)
    rows = []
    default = select_blocks_triton(q, k1, k2, length - queries, p, scale)
    configs = [(rr, ww, ss, None) for rr in (64, 128, 256) for ww in (4, 8) for ss in (2, 3)]
    for r, w, s, bt in configs + [(128, 4, 2, 16), (128, 4, 2, 64), (128, 4, 1, None)]:
        def call(r=r, w=w, s=s, bt=bt):
            return select_blocks_triton(q, k1, k2, length - queries, p, scale, rows=r, num_warps=w, num_stages=s,
                                        block_tile=bt)
        try:
            ms = timed(call)
            kernels = kernel_ms(call)
        except Exception as e:  # noqa: BLE001 - a config can exceed registers or shared memory; say so
            print(f"  select rows={r} warps={w} stages={s} block_tile={bt}: {type(e).__name__}")
            continue
        row = {"op": "select_sweep", "context": length, "queries": queries, "rows": r, "num_warps": w,
               "num_stages": s, "block_tile": bt, "ms": ms, "tflops": select_flop(queries, length, p) / ms / 1e9,
               "kernels_ms": kernels, "same_selection": bool(torch.equal(call(), default))}
        rows.append(row)
        print(row)
    n_blocks = length // p.block_size
    keys = torch.randint(-(2**62), 2**62, (HKV_SPARSE, queries, n_blocks), device="cuda", dtype=torch.int64)
    row = {"op": "select_topk_only", "context": length, "queries": queries,
           "ms": timed(lambda: _top_blocks(keys, p.selected, 1024)),
           "sort_ms": timed(lambda: _top_blocks(keys, p.selected, 0, method="sort"))}
    assert torch.equal(_top_blocks(keys, p.selected, 1024), _top_blocks(keys, p.selected, 0, method="sort"))
    rows.append(row)
    print(row)
    return rows


def _scorer_keys(module, call) -> list[torch.Tensor]:
    """The sort keys the scorer wrote during call() (one tensor per tile of queries), for a bitwise comparison."""
    saved, chosen = [], module._chosen_blocks

    def keep(keys, *args):
        saved.append(keys.clone())
        return chosen(keys, *args)

    module._chosen_blocks = keep
    try:
        call()
    finally:
        module._chosen_blocks = chosen
    return saved


def select_against(baseline: str, contexts, chunk: int, variants=(), ref_queries: int = 1024) -> list[dict]:
    """The working tree's block selection against another version of kernels/sparse/triton_select.py (a file,
    e.g. `git show REV:kernels/sparse/triton_select.py > before.py`), the same inputs in one run, alternating:
    wall time, each kernel's GPU time, whether the two select the same blocks and write the same key bits, and
    how many selected ids differ from the fp32 reference's over the chunk's last `ref_queries` queries.
    `variants` (dicts of select_blocks_triton keywords) time more settings of the working tree's file."""
    import importlib.util

    from salachat.kernels.sparse import triton_select as current

    spec = importlib.util.spec_from_file_location("select_baseline", baseline)
    before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(before)
    p, scale, rows = SparseParams(), D**-0.5, []
    settings = [("baseline", before, {}), ("current", current, {})]
    settings += [(json.dumps(v, sort_keys=True), current, v) for v in variants]
    for length in contexts:
        k = torch.randn(HKV_SPARSE, length, D, device="cuda", dtype=torch.bfloat16)
        k1, k2 = compress_keys(k, p.kernel_size, p.kernel_stride), compress_keys(k, 4 * p.kernel_size, 4 * p.kernel_stride)
        del k
        for t in (chunk, 1):
            q = torch.randn(H, t, D, device="cuda", dtype=torch.bfloat16)
            calls = {name: (lambda m=m, kw=kw: m.select_blocks_triton(q, k1, k2, length - t, p, scale, **kw))
                     for name, m, kw in settings}
            r = min(ref_queries, t)
            want = select_blocks_ref(q[:, t - r:], k1, k2, length - r, p, scale)
            base_sel, base_keys = calls["baseline"](), _scorer_keys(before, calls["baseline"])
            row = {"op": "select_against", "baseline": baseline, "context": length, "queries": t, "ref_queries": r,
                   "baseline_ref_diff": int((base_sel[:, t - r:] != want).sum())}
            for name, m, _ in settings[1:]:
                sel = calls[name]()
                if m._FLASH_FAILED:  # a setting that does not build (shared memory, say) must not leave every
                    # later call of this process on the tile scorer
                    row[f"{name}_failed"] = m._FLASH_FAILED.pop()
                    del calls[name]
                    continue
                keys = _scorer_keys(m, calls[name])
                row[f"{name}_same_selection"] = bool(torch.equal(sel, base_sel))
                row[f"{name}_same_keys"] = all(torch.equal(a, b) for a, b in zip(keys, base_keys, strict=True))
                row[f"{name}_ref_diff"] = int((sel[:, t - r:] != want).sum())
                del keys
            row["same_selection"] = row["current_same_selection"]
            del base_keys, want
            _time_alternating(row, calls, t)
            rows.append(row)
            print(row)
        del k1, k2
        torch.cuda.empty_cache()
    return rows


def _time_alternating(row: dict, calls: dict, t: int) -> None:
    """Wall time of each call, alternating over two rounds, then its GPU time, into `row`."""
    for _ in range(2):
        for name, call in calls.items():
            row.setdefault(f"{name}_ms", []).append(timed(call, repeat=5 if t > 1 else 50))
    for name, call in calls.items():
        row[f"{name}_kernels_ms"] = kernel_ms(call)


def pooled_selection(idx: torch.Tensor, length: int, bq: int, p: SparseParams) -> torch.Tensor:
    """A selection shaped as `idx` (the first block and each query's local window forced) whose other blocks
    every tile of bq queries shares: query j of each tile takes the j-th share of one pool of blocks. A tile's
    union is as large as with independent choices, but all tiles read the same blocks (from the L2 cache):
    the attention's time on it, against a real selection's, says what reading K/V from memory costs."""
    kv, t, width = idx.shape
    qb = (torch.arange(length - t, length, device=idx.device) // p.block_size)
    forced = p.init_blocks + p.local_blocks + 1
    free = width - forced
    low = int(qb.min()) - p.local_blocks  # pool blocks below every query's window
    pool = torch.stack([torch.randperm(low - p.init_blocks, device=idx.device)[: bq * free] + p.init_blocks
                        for _ in range(kv)]).view(kv, bq, free)
    chosen = pool[:, torch.arange(t, device=idx.device) % bq]  # [kv, t, free]
    window = (qb[:, None] - p.local_blocks + torch.arange(p.local_blocks + 1, device=idx.device)).expand(kv, t, -1)
    first = torch.arange(p.init_blocks, device=idx.device).expand(kv, t, -1)
    return torch.cat([first, chosen, window], -1).sort(-1).values.to(torch.int32).contiguous()


def attend_against(contexts, chunk: int, variants, selections=("scored",)) -> list[dict]:
    """The block-sparse attention with other keywords of block_sparse_attention_triton (`variants`) against its
    defaults, the same inputs and selection in one run, alternating: wall time, GPU time, largest difference.
    `selections`: "scored" (the selection kernel's, on random q and k: neighbouring queries choose unrelated
    blocks) and/or "pooled" (pooled_selection: the same union sizes, every tile reading the same blocks)."""
    from salachat.kernels.sparse.triton_attention import _tile_queries, block_sparse_attention_triton
    from salachat.kernels.sparse.triton_select import select_blocks_triton

    p, scale, rows = SparseParams(), D**-0.5, []
    for length in contexts:
        k = torch.randn(HKV_SPARSE, length, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        k1, k2 = compress_keys(k, p.kernel_size, p.kernel_stride), compress_keys(k, 4 * p.kernel_size, 4 * p.kernel_stride)
        for t, selection in [(t, s) for t in (chunk, 1) for s in selections if t > 1 or s == "scored"]:
            q = torch.randn(H, t, D, device="cuda", dtype=torch.bfloat16)
            idx = select_blocks_triton(q, k1, k2, length - t, p, scale)
            if selection == "pooled":
                idx = pooled_selection(idx, length, _tile_queries(H // HKV_SPARSE, t), p)
            calls = {json.dumps(kw, sort_keys=True): (lambda kw=kw: block_sparse_attention_triton(
                q, k, v, idx, length - t, p.block_size, scale, **kw)) for kw in [{}, *variants]}
            want = calls["{}"]().float()
            row = {"op": "attend_against", "context": length, "queries": t, "selection": selection}
            for name, call in calls.items():
                row[f"{name}_max_diff"] = (call().float() - want).abs().max().item()
            _time_alternating(row, calls, t)
            rows.append(row)
            print(row)
        del k, v, k1, k2
        torch.cuda.empty_cache()
    return rows


def silu_sweep(rows: int = 65536, width: int = 16384, rounds: int = 3) -> list[dict]:
    """silu_mul on a prefill chunk's fused gate/up [rows, 2 width] (bf16), tile settings against the default,
    each checked for torch's bits, timed alternating over `rounds` (the best kept); bandwidth counts the bytes
    read and written."""
    from salachat.kernels.pointwise.reference import silu_mul_ref
    from salachat.kernels.pointwise.triton import silu_mul_triton

    x = torch.randn(rows, 2 * width, device="cuda", dtype=torch.bfloat16) * 3
    want = silu_mul_ref(x)
    settings = [{}] + [{"rows": r, "bn": b, "num_warps": w} for r, b, w in
                       [(1, 1024, 8), (2, 512, 8), (4, 512, 4), (1, 2048, 8), (2, 1024, 8), (1, 4096, 16),
                        (8, 512, 8), (4, 1024, 8)]]
    out = [{"op": "silu_mul", "settings": kw, "same_bits": bool(torch.equal(silu_mul_triton(x, **kw), want)),
            "ms_rounds": []} for kw in settings]
    for _ in range(rounds):
        for row in out:
            row["ms_rounds"].append(timed(lambda kw=row["settings"]: silu_mul_triton(x, **kw), repeat=10))
    for row in out:
        row["ms"] = min(row["ms_rounds"])
        row["gbps"] = x.numel() * 1.5 * 2 / row["ms"] / 1e6
        print(row)
    del x, want
    torch.cuda.empty_cache()
    return out


def gemm_shapes(rows: int = 65536, rounds: int = 3) -> list[dict]:
    """The 9B model's prefill matmuls for a chunk of `rows` tokens (cuBLAS through F.linear, bf16, random
    data), each alone and in 3 alternating rounds (the best kept), beside a square 8192 product: how near the
    rate the GPU gives a large product the chunk's GEMMs run."""
    shapes = {"square 8192": (8192, 8192, 8192), "Lightning q/k/v/gate": (rows, 4096, 16384),
              "sparse q/k/v": (rows, 4096, 4608), "o_proj, output gate": (rows, 4096, 4096),
              "MLP gate/up": (rows, 4096, 32768), "MLP down": (rows, 16384, 4096)}
    out = []
    for name, (m, k, n) in shapes.items():
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        ms = min(timed(lambda x=x, w=w: torch.nn.functional.linear(x, w), repeat=10) for _ in range(rounds))
        row = {"op": "gemm", "shape": name, "m": m, "k": k, "n": n, "ms": ms, "tflops": 2 * m * k * n / ms / 1e9}
        out.append(row)
        print(row)
        del x, w
    torch.cuda.empty_cache()
    return out


def selection_keys(length: int, t: int, scores: str) -> torch.Tensor:
    """Keys [2, t, n_blocks] as the scorers write them for the last t queries of a `length` context: block 0 and
    the local window forced (+inf), blocks past the query -inf, the others fp32 scores (or bf16-rounded ones,
    which tie often)."""
    from salachat.kernels.sparse.triton_topk import pack_keys

    p = SparseParams()
    n_blocks = (length - 1) // p.block_size + 1
    score = torch.rand(HKV_SPARSE, t, n_blocks, device="cuda") ** 3
    if scores == "bf16":
        score = score.bfloat16().float()
    block = torch.arange(n_blocks, device="cuda")
    qb = (torch.arange(length - t, length, device="cuda") // p.block_size)[:, None]
    forced = (block < p.init_blocks) | ((block >= qb - p.local_blocks) & (block <= qb))
    score = torch.where(forced, float("inf"), torch.where(block <= qb, score, float("-inf")))
    return pack_keys(score)


def bench_topk(contexts, queries: int, sweep: bool) -> list[dict]:
    """The selection's top-k alone: torch.topk in two rounds (the CPU path and fallback) against the Triton
    kernel, for a prefill chunk and one decoded token, on fp32 and bf16-rounded scores."""
    from salachat.kernels.sparse.triton_select import TOPK_TILE, _top_blocks
    from salachat.kernels.sparse.triton_topk import fits, top_blocks_triton

    p, rows = SparseParams(), []
    for length in contexts:
        for t, scores in ((queries, "fp32"), (queries, "bf16"), (1, "fp32")):
            keys = selection_keys(length, t, scores)
            width, k = keys.shape[-1], min(p.selected, keys.shape[-1])
            tile = TOPK_TILE if width % TOPK_TILE == 0 and width > 2 * TOPK_TILE else 0  # as select pads
            want = _top_blocks(keys, k, tile).int()
            assert torch.equal(top_blocks_triton(keys, k), want)
            reps = 5 if t > 1 else 50
            row = {"op": "topk_prefill" if t > 1 else "topk_decode", "context": length, "queries": t,
                   "scores": scores, "blocks": width, "k": k,
                   "torch_ms": timed(lambda: _top_blocks(keys, k, tile), repeat=reps),
                   "triton_ms": timed(lambda: top_blocks_triton(keys, k), repeat=reps)}
            row["triton_gbps"] = keys.numel() * 8 / row["triton_ms"] / 1e6
            if t == 1:  # eager decode pays the launches from Python; replayed from a graph, the GPU time alone
                row["torch_graph_ms"] = graphed(lambda: _top_blocks(keys, k, tile))
                row["triton_graph_ms"] = graphed(lambda: top_blocks_triton(keys, k))
            if sweep and t == 1:  # a decoded token's 2 rows by rows in two rounds, tiles of 512-8192 columns
                for r in (512, 1024, 2048, 4096, 8192):
                    if width > r and fits(width, k, r, group=0):
                        assert torch.equal(top_blocks_triton(keys, k, row=r, group=0), want)
                        row[f"rows{r}_graph_ms"] = graphed(lambda: top_blocks_triton(keys, k, row=r, group=0))
            if sweep and scores == "fp32":  # by rows (group 0) and by groups of 2-16 columns, 1-8 warps
                for g, w in [(gg, ww) for gg in (0, 2, 4, 8, 16) for ww in ((4, 8) if gg == 0 else (1, 2, 4, 8))]:
                    if fits(width, k, group=g):
                        assert torch.equal(top_blocks_triton(keys, k, group=g, num_warps=w), want)
                        row[f"group{g}_w{w}_ms"] = timed(lambda: top_blocks_triton(keys, k, group=g, num_warps=w),
                                                         repeat=reps)
            rows.append(row)
            print(row)
            del keys
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lightning-lengths", nargs="+", type=int, default=[32768, 131072])
    parser.add_argument("--sparse-contexts", nargs="+", type=int, default=[32768, 131072, 524288, 1048576])
    parser.add_argument("--chunk", type=int, default=16384, help="queries per prefill call (the engine's chunk)")
    parser.add_argument("--sweep", action="store_true", help="try lightning kernel configurations")
    parser.add_argument("--reference", action="store_true", help="also time the sparse PyTorch reference")
    parser.add_argument("--select-sweep", type=int, default=0, metavar="CONTEXT",
                        help="also sweep the flash scorer's configurations at this context (--chunk queries)")
    parser.add_argument("--select-against", metavar="FILE",
                        help="also time the selection against this other version of triton_select.py at the "
                             "--sparse-contexts (then those contexts get no other sparse rows)")
    parser.add_argument("--select-variants", nargs="+", default=[], metavar="JSON",
                        help="with --select-against, also time these select_blocks_triton keywords of the working "
                             "tree's file, e.g. '{\"num_stages\": 2}'")
    parser.add_argument("--attend-variants", nargs="+", default=[], metavar="JSON",
                        help="also time the sparse attention with these block_sparse_attention_triton keywords "
                             "against its defaults at the --sparse-contexts")
    parser.add_argument("--attend-selections", nargs="+", default=["scored"], choices=["scored", "pooled"],
                        help="with --attend-variants: the selections to time them on (see attend_against)")
    parser.add_argument("--silu-sweep", action="store_true", help="time silu_mul's tile settings")
    parser.add_argument("--gemm-shapes", action="store_true", help="time the 9B model's prefill GEMM shapes")
    parser.add_argument("--topk-contexts", nargs="+", type=int, default=[], metavar="CONTEXT",
                        help="also time the selection's top-k alone (torch.topk against Triton) at these contexts")
    parser.add_argument("--topk-sweep", action="store_true", help="try the Triton top-k's groups and warps")
    parser.add_argument("--out", default="bench/results/kernels.json")
    args = parser.parse_args()
    rows = sweep_select(args.select_sweep, args.chunk) if args.select_sweep else []
    rows += bench_topk(args.topk_contexts, args.chunk, args.topk_sweep) if args.topk_contexts else []
    lengths = [t for t in args.lightning_lengths if t > 0]  # 0: no Lightning rows
    contexts = [t for t in args.sparse_contexts if t > 0]  # 0: no sparse rows
    rows += silu_sweep() if args.silu_sweep else []
    rows += gemm_shapes(args.chunk) if args.gemm_shapes else []
    if args.attend_variants:
        rows += attend_against(contexts, args.chunk, [json.loads(v) for v in args.attend_variants],
                               args.attend_selections)
    if args.select_against:
        rows += select_against(args.select_against, contexts, args.chunk, [json.loads(v) for v in args.select_variants])
    if args.attend_variants or args.select_against:
        contexts = []
    rows += (bench_lightning(lengths, args.sweep) if lengths else []) + bench_sparse(contexts, args.chunk, args.reference)
    print("\n| op | size | triton / sparse ms | baseline ms |")
    print("|---|---|---|---|")
    for r in rows:
        if r["op"] == "select_against":
            for name in [n[:-3] for n in r if n.endswith("_ms") and not n.endswith("kernels_ms") and n != "baseline_ms"]:
                print(f"| select, {name} against {r['baseline']} | L={r['context']}, T={r['queries']} | "
                      f"{min(r[name + '_ms']):.3f} | {min(r['baseline_ms']):.3f} (same selection: "
                      f"{r[name + '_same_selection']}, same keys: {r[name + '_same_keys']}; ids off the reference "
                      f"in the last {r['ref_queries']} queries: {r[name + '_ref_diff']} against "
                      f"{r['baseline_ref_diff']}) |")
            for name in [n[:-7] for n in r if n.endswith("_failed")]:
                print(f"| select, {name} | L={r['context']}, T={r['queries']} | did not build: "
                      f"{r[name + '_failed'][:80]} | |")
            continue
        if r["op"].startswith("select_"):
            continue
        if r["op"] == "gemm":
            print(f"| GEMM {r['shape']} | {r['m']} x {r['k']} x {r['n']} | {r['ms']:.3f} ({r['tflops']:.0f} TFLOP/s) | |")
            continue
        if r["op"] == "silu_mul":
            print(f"| silu_mul {r['settings']} | 65536 x 16384 | {r['ms']:.3f} ({r['gbps']:.0f} GB/s, torch's bits: "
                  f"{r['same_bits']}) | |")
            continue
        if r["op"] == "attend_against":
            for name in [n[:-3] for n in r if n.endswith("_ms") and not n.endswith("kernels_ms")]:
                gpu = ", ".join(f"{key[:24]} {ms:.2f}" for key, ms in r[name + "_kernels_ms"].items() if ms > 0.01)
                print(f"| attend {r['selection']}, {name} | L={r['context']}, T={r['queries']} | {min(r[name + '_ms']):.3f} | "
                      f"{min(r['{}_ms']):.3f} (largest difference {r[name + '_max_diff']:.2e}; GPU ms: {gpu}) |")
            continue
        if r["op"].startswith("topk"):
            graph = (f"; graphed {r['triton_graph_ms']:.4f} vs {r['torch_graph_ms']:.4f}"
                     if "triton_graph_ms" in r else "")
            print(f"| {r['op']} ({r['scores']} scores) | L={r['context']}, T={r['queries']}, k={r['k']} | "
                  f"{r['triton_ms']:.3f} ({r['triton_gbps']:.0f} GB/s{graph}) | torch.topk {r['torch_ms']:.3f} "
                  f"({r['torch_ms'] / r['triton_ms']:.1f}x) |")
            continue
        if r["op"].startswith("lightning"):
            base = ", ".join(f"{k[:-3]} {r[k]:.3f}" for k in r if k.endswith("_ms") and k != "triton_ms")
            print(f"| {r['op']} | T={r['tokens']} | {r['triton_ms']:.3f} | {base} |")
        else:
            print(f"| {r['op']} | L={r['context']}, T={r['queries']} | {r['sparse_ms']:.3f} (select {r['select_ms']:.3f}"
                  f" = {r['select_tflops']:.0f} TFLOP/s; tile scorer {r['select_tile_ms']:.3f}; torch.topk "
                  f"{r['select_torch_topk_ms']:.3f}) "
                  f"| dense {r['dense_sdpa_ms']:.3f} ({r['speedup_vs_dense']:.1f}x) |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
