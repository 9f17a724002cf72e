"""One token's matmul over packed GGUF weights: the numba kernel (kernels/packed_gemv/) against torch's int4
kernel, per shape of the default model, in one process.

Random weights quantised by gguf's own code to each kind (Q4_0, Q4_1, Q8_0), in the layout torch packs on
this CPU (`qlinear.PACK_BLOCK`); for each shape the two kernels alternate for 5 rounds of 200 calls on
SALACHAT_THREADS threads (2). Prints the best round of each (us a call) and how far each is from the float64
product, and writes $OUT/packed_gemv_ab.json (else bench/results/).

    .venv/bin/python bench/packed_gemv_ab.py [--kinds Q4_1 Q8_0] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("SALACHAT_THREADS", "2")
import salachat  # noqa: E402, F401  (before torch: OpenMP's wait policy)
import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from salachat.engine import qlinear  # noqa: E402
from salachat.engine.gguf_file import TensorInfo  # noqa: E402
from salachat.engine.threads import configure_threads  # noqa: E402
from salachat.kernels import packed_gemv  # noqa: E402

# the default model's (SmolLM2-135M) matrices a decode step multiplies: out x in
SHAPES = {"q/k/v": (960, 576), "o": (576, 576), "gate/up": (3072, 576), "down": (576, 1536),
          "LM head": (49152, 576)}


def _layer(qtype: str, n: int, k: int) -> qlinear.QuantLinear:
    rng = np.random.default_rng(n + k)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    raw = gguf.quants.quantize(w, kind)
    return qlinear.QuantLinear.from_gguf(torch.from_numpy(raw), TensorInfo("w", (n, k), kind, 0))


def _time(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kinds", nargs="+", default=["Q4_1", "Q8_0"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    configure_threads()
    report = {"threads": torch.get_num_threads(), "pack_block": qlinear.PACK_BLOCK, "rows": []}
    print(f"{torch.get_num_threads()} threads, torch's int4 layout {qlinear.PACK_BLOCK} rows a block")
    print(f"{'kind':5} {'matrix':8} {'shape':>11} | {'numba us':>9} {'torch us':>9} {'speed-up':>8} | "
          f"{'numba err':>9} {'torch err':>9}")
    for qtype in args.kinds:
        for name, (n, k) in SHAPES.items():
            layer = _layer(qtype, n, k)
            x = torch.randn(1, k, generator=torch.Generator().manual_seed(k))
            ours = lambda: packed_gemv.matvec(layer, x)  # noqa: E731
            theirs = lambda: layer._packed_mm(x.bfloat16())  # noqa: E731
            if ours() is None:
                raise SystemExit(f"the numba kernel does not serve here: {packed_gemv._FAILED}")
            want = layer.dequantized(torch.float32).double() @ x[0].double()
            errors = [((f().double()[0] - want).abs().max() / want.abs().max()).item() for f in (ours, theirs)]
            times = {"numba": [], "torch": []}
            for _ in range(args.rounds):
                times["numba"].append(_time(ours, args.calls))
                times["torch"].append(_time(theirs, args.calls))
            best = {key: min(v) for key, v in times.items()}
            row = {"kind": qtype, "matrix": name, "shape": [n, k], "us": times, "best_us": best,
                   "rel_error": {"numba": errors[0], "torch": errors[1]}}
            report["rows"].append(row)
            print(f"{qtype:5} {name:8} {n:>5}x{k:<5} | {best['numba']:9.1f} {best['torch']:9.1f} "
                  f"{best['torch'] / best['numba']:7.2f}x | {errors[0]:9.1e} {errors[1]:9.1e}")
    where = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(where, exist_ok=True)
    with open(os.path.join(where, "packed_gemv_ab.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
