"""A decoded token's linear layers: the Triton GEMV (kernels/gemv/) against cuBLAS, on a CUDA GPU.

1. Each linear shape of MiniCPM-SALA 9B, one row, timed in a CUDA graph over enough distinct weights that
   none is read from L2: cuBLAS (torch.nn.functional.linear) against the GEMV at its default tiles.
2. The whole model (random bf16 weights) after reading CTX tokens in 64K chunks: decode alternating between
   the two (the dispatcher's GEMV taken out for cuBLAS), `ROUNDS` rounds on the same cache, 64 tokens each
   without reading the token back and 32 reading it back every step, as the product decodes.

    CTX=1048576 python bench/gemv_ab.py      (prints a table, writes $OUT/gemv_ab.json, else bench/results/)
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import e2e  # noqa: E402
from salachat import kernels  # noqa: E402
from salachat.kernels.gemv.triton import gemv_triton  # noqa: E402

# (outputs, inputs): o_proj and the output gate; a sparse layer's q/k/v; down; a Lightning layer's q/k/v/gate;
# gate/up; the LM head. The count is how many a token runs.
SHAPES = {(4096, 4096): 40, (4608, 4096): 8, (4096, 16384): 32, (16384, 4096): 24, (32768, 4096): 32,
          (73448, 4096): 1}


def graph_ms(fn, reps: int = 20) -> float:
    """Milliseconds of one replay of a CUDA graph of fn, the best of 3 runs of `reps` replays."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        stop.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(stop) / reps)
    return best


def shapes_table() -> dict:
    rows = {}
    for (n, k), count in SHAPES.items():
        copies = max(2, (800 << 20) // (n * k * 2))  # > 10x the L2
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        cublas = graph_ms(lambda: [torch.nn.functional.linear(x, w) for w in weights]) / copies * 1e3
        ours = graph_ms(lambda: [gemv_triton(x, w) for w in weights]) / copies * 1e3
        gb = n * k * 2 / 1e9
        rows[f"{n}x{k}"] = {"count": count, "cublas_us": cublas, "gemv_us": ours, "cublas_tbs": gb / cublas * 1e3,
                            "gemv_tbs": gb / ours * 1e3}
        print(f"{n:>6} x {k:<6} x{count:<3} cuBLAS {cublas:7.2f} us ({gb / cublas * 1e3:4.2f} TB/s)   "
              f"GEMV {ours:7.2f} us ({gb / ours * 1e3:4.2f} TB/s)", flush=True)
        del weights
        torch.cuda.empty_cache()
    total = {name: sum(r["count"] * r[f"{name}_us"] for r in rows.values()) / 1e3 for name in ("cublas", "gemv")}
    print(f"a token's GEMVs: cuBLAS {total['cublas']:.3f} ms, GEMV {total['gemv']:.3f} ms", flush=True)
    return {"shapes": rows, "token_ms": total}


def model_ab(ctx: int, rounds: int) -> dict:
    model = e2e.build("sala", "cuda")
    gemv = kernels._TRITON["gemv"]
    chunk = 65536
    ids = torch.randint(1000, 70000, (ctx,), device="cuda")
    cache = model.new_cache()
    report: dict = {"context": ctx}
    with torch.inference_mode():
        t = time.perf_counter()
        for b in range(0, ctx, chunk):
            logits = model(ids[b : b + chunk], cache, last_only=True)
        torch.cuda.synchronize()
        report["prefill_s"] = time.perf_counter() - t
        tok = logits[-1].argmax().view(1)
        for _ in range(rounds):
            for name in ("cublas", "gemv"):
                if name == "gemv":
                    kernels._TRITON["gemv"] = gemv
                else:
                    kernels._TRITON.pop("gemv", None)
                if hasattr(model, "_graphs"):
                    del model._graphs  # captured again, with this variant's kernels
                for _ in range(3):
                    tok = model(tok, cache)[-1].argmax().view(1)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(64):
                    tok = model(tok, cache)[-1].argmax().view(1)
                torch.cuda.synchronize()
                free = (time.perf_counter() - t) / 64 * 1e3
                t = time.perf_counter()
                for _ in range(32):
                    tok = torch.tensor([int(model(tok, cache)[-1].argmax())], device="cuda")
                synced = (time.perf_counter() - t) / 32 * 1e3
                report.setdefault(f"{name}_decode_ms", []).append(free)
                report.setdefault(f"{name}_decode_read_back_ms", []).append(synced)
                print(f"{name:6} decode {free:.3f} ms/token, reading each token back {synced:.3f}", flush=True)
    kernels._TRITON["gemv"] = gemv
    return report


def main() -> None:
    report = shapes_table()
    report["model"] = model_ab(int(os.environ.get("CTX", 1 << 20)), int(os.environ.get("ROUNDS", 3)))
    m = report["model"]
    print(f"\n| decode at {m['context']} tokens | cuBLAS | GEMV |\n| --- | --- | --- |")
    for key, label in (("decode_ms", "ms/token"), ("decode_read_back_ms", "ms/token, token read back")):
        print(f"| {label} | {min(m['cublas_' + key]):.3f} ({max(m['cublas_' + key]):.3f}) | "
              f"{min(m['gemv_' + key]):.3f} ({max(m['gemv_' + key]):.3f}) |")
    where = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    with open(os.path.join(where, "gemv_ab.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
