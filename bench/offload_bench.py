"""Decode through one InfLLM-V2 sparse layer with all its KV on the GPU against only the newest blocks there.

The 9B MiniCPM-SALA sparse-layer shape (32 query heads, Hkv=2, D=128, blocks of 64, top-k 64 + 32 local
blocks, dense_len 8192, bf16) at a 1M-token context of random K/V. Measured in one run:
  resident   every token's K/V in GPU memory (SparseKVCache's default)
  offloaded  only the local window (+ headroom) resident; the other selected blocks gathered from pinned host
             memory and copied up at each step (SparseKVCache(resident_blocks=...))
Per decode step: median time, blocks and MB fetched; per layer: GPU bytes of K/V held; for the model, the
GPU memory saved over its 8 sparse layers. Random queries select unrelated blocks at every step, so the
fetch is the worst case (real decode selects mostly the same blocks step after step).

    .venv/bin/python bench/offload_bench.py --device cuda
    .venv/bin/python bench/offload_bench.py --device cpu --smoke   # minutes → seconds: a check of the script
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("salachat") is None:  # a checkout not installed (the GPU machine): its root, last,
    sys.path.append(str(ROOT))  # so that its kernels/ and engine/ folders never shadow PyPI packages of those names

from salachat.engine.sparse_cache import SparseKVCache
from salachat.kernels import SparseParams

DRIFT = 0.3  # how far a query moves per step in the "drifting" run
SPARSE_LAYERS_9B = 8  # of the 32 layers of MiniCPM-SALA 9B; the rest are Lightning (fixed-size state)
LAYER_9B = {"heads": 32, "kv_heads": 2, "head_dim": 128,
            "params": SparseParams(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1,
                                   local_blocks=32, topk=64, dense_len=8192)}
LAYER_SMOKE = {"heads": 4, "kv_heads": 2, "head_dim": 32,
               "params": SparseParams(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1,
                                      local_blocks=4, topk=8, dense_len=512)}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def device_kv_bytes(cache: SparseKVCache) -> int:
    """GPU bytes the layer's K/V take (the compressed keys are reported apart: they stay either way)."""
    if cache.offloaded is not None:
        return cache.offloaded.device_bytes
    return sum(t.numel() * t.element_size() for t in (cache.keys, cache.values))


def filled(layer: dict, context: int, dtype, device: str, chunk: int) -> SparseKVCache:
    torch.manual_seed(0)
    cache = SparseKVCache(layer["kv_heads"], layer["head_dim"], layer["params"], dtype, device)
    for begin in range(0, context, chunk):  # K/V only: what decode reads, without paying a 1M prefill
        n = min(chunk, context - begin)
        kv = torch.randn(2, layer["kv_heads"], n, layer["head_dim"], device=device).to(dtype)
        cache.append(kv[0], kv[1])
    return cache


def decode(cache: SparseKVCache, layer: dict, steps: int, dtype, device: str, drift: float = 1.0) -> list[float]:
    """Time `steps` decode steps. drift 1: a fresh random query each step (unrelated selections, the worst
    case for fetching); below 1, each query moves that far from the last (selections overlap, as in text)."""
    times = []
    scale = layer["head_dim"] ** -0.5
    q = torch.randn(layer["heads"], 1, layer["head_dim"], device=device)
    for _ in range(steps):
        q = (1 - drift**2) ** 0.5 * q + drift * torch.randn_like(q)
        kv = torch.randn(2, layer["kv_heads"], 1, layer["head_dim"], device=device).to(dtype)
        sync(device)
        t0 = time.perf_counter()
        cache.attend(q.to(dtype), kv[0], kv[1], cache.length, scale)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def run(device: str, smoke: bool, context: int, steps: int, warmup: int) -> dict:
    layer = LAYER_SMOKE if smoke else LAYER_9B
    params: SparseParams = layer["params"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    element = torch.tensor([], dtype=dtype).element_size()
    block_bytes = 2 * layer["kv_heads"] * params.block_size * layer["head_dim"] * element
    cache = filled(layer, context, dtype, device, chunk=1 << 16)
    compressed = sum(t.numel() * t.element_size() for t in (cache.k1, cache.k2))
    decode(cache, layer, warmup, dtype, device)
    resident_times = decode(cache, layer, steps, dtype, device)
    resident_bytes = device_kv_bytes(cache)

    sync(device)
    t0 = time.perf_counter()
    cache.set_resident_blocks(params.local_blocks + 1)  # the local window and the query's own block
    sync(device)
    offload_seconds = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.empty_cache()
    decode(cache, layer, warmup, dtype, device)
    fetched_before = cache.offloaded.fetched_blocks
    offloaded_times = decode(cache, layer, steps, dtype, device)
    fetched = (cache.offloaded.fetched_blocks - fetched_before) / steps
    offloaded_bytes = device_kv_bytes(cache)
    decode(cache, layer, warmup, dtype, device, drift=DRIFT)
    fetched_before, reused_before = cache.offloaded.fetched_blocks, cache.offloaded.reused_blocks
    drifting_times = decode(cache, layer, steps, dtype, device, drift=DRIFT)
    drifting_fetched = (cache.offloaded.fetched_blocks - fetched_before) / steps
    drifting_reused = (cache.offloaded.reused_blocks - reused_before) / steps

    resident_ms, offloaded_ms, drifting_ms = (statistics.median(t) * 1e3 for t in
                                              (resident_times, offloaded_times, drifting_times))
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "smoke": smoke, "context": context, "steps": steps, "dtype": str(dtype),
        "shape": {"heads": layer["heads"], "kv_heads": layer["kv_heads"], "head_dim": layer["head_dim"],
                  "block_size": params.block_size, "topk": params.topk, "local_blocks": params.local_blocks,
                  "dense_len": params.dense_len},
        "resident_blocks": cache.resident_blocks,
        "query_drift": DRIFT,
        "decode_ms": {"resident": resident_ms, "offloaded": offloaded_ms, "offloaded_drifting": drifting_ms},
        "decode_ms_p90": {name: sorted(t)[int(0.9 * steps)] * 1e3 for name, t in (
            ("resident", resident_times), ("offloaded", offloaded_times), ("offloaded_drifting", drifting_times))},
        "fetched_blocks_per_step": fetched,
        "fetched_mb_per_step": fetched * block_bytes / 1e6,
        "drifting_fetched_blocks_per_step": drifting_fetched,
        "drifting_reused_blocks_per_step": drifting_reused,
        "layer_kv_gpu_bytes": {"resident": resident_bytes, "offloaded": offloaded_bytes},
        "layer_compressed_keys_gpu_bytes": compressed,
        "model_gpu_gb_saved_9b": SPARSE_LAYERS_9B * (resident_bytes - offloaded_bytes) / 2**30,
        "offload_one_layer_seconds": offload_seconds,
    }


def table(r: dict) -> str:
    gib = 2**30
    ms, p90 = r["decode_ms"], r["decode_ms_p90"]
    rows = [
        ("decode step, one sparse layer (median)", f"{ms['resident']:.2f} ms", f"{ms['offloaded']:.2f} ms",
         f"{ms['offloaded_drifting']:.2f} ms"),
        ("decode step, p90", f"{p90['resident']:.2f} ms", f"{p90['offloaded']:.2f} ms",
         f"{p90['offloaded_drifting']:.2f} ms"),
        ("blocks fetched per step", "0", f"{r['fetched_blocks_per_step']:.1f} ({r['fetched_mb_per_step']:.1f} MB)",
         f"{r['drifting_fetched_blocks_per_step']:.1f} (+{r['drifting_reused_blocks_per_step']:.1f} kept)"),
        ("layer K/V in GPU memory", f"{r['layer_kv_gpu_bytes']['resident'] / gib:.3f} GiB",
         f"{r['layer_kv_gpu_bytes']['offloaded'] / gib:.4f} GiB", ""),
    ]
    lines = [f"{r['context']:,} tokens, {r['device']}, resident_blocks={r['resident_blocks']}",
             f"| | all resident | offloaded, random queries | offloaded, drifting queries ({r['query_drift']}) |",
             "| --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append(f"GPU memory saved over the 9B model's {SPARSE_LAYERS_9B} sparse layers: "
                 f"{r['model_gpu_gb_saved_9b']:.2f} GiB (compressed keys stay: "
                 f"{r['layer_compressed_keys_gpu_bytes'] / 2**20:.1f} MiB a layer); "
                 f"offloading one filled layer took {r['offload_one_layer_seconds']:.2f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="a small layer and context: checks the script")
    parser.add_argument("--context", type=int, default=None, help="tokens in the cache (default 1M; smoke 4096)")
    parser.add_argument("--steps", type=int, default=None, help="decode steps timed (default 50; smoke 4)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "offload.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU: run with --device cpu --smoke to check the script")
    context = args.context or (4096 if args.smoke else 1 << 20)
    steps = args.steps or (4 if args.smoke else 50)
    result = run(args.device, args.smoke, context, steps, warmup=2 if args.smoke else 10)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
