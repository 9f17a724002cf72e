"""One token's matmul over packed GGUF weights: the integer kernel (activations rounded to 8 bits, AVX2), the
fp32 numba kernel and torch's int4 kernel, per shape of the default model, then a whole decode step, in one
process.

Per shape: random weights quantised by gguf's own code to each kind (Q4_0, Q4_1, Q8_0), in the layout torch
packs on this CPU (`qlinear.PACK_BLOCK`); the kernels alternate for 5 rounds of 200 calls on SALACHAT_THREADS
threads (2). Prints the best round of each (us a call) and how far each is from the float64 product of the
unrounded input. Then (--decode-tokens, default 2048; 0 skips it) the default model (or --model) reads that
many tokens of the sample document and decodes 32 tokens at a time on the same cache, alternating the
integer and the fp32 kernel (layer by layer: `fused_decode` off), for --rounds rounds. Writes $OUT/packed_gemv_ab.json (else bench/results/).

    .venv/bin/python bench/packed_gemv_ab.py [--kinds Q4_1 Q8_0] [--rounds 5] [--decode-tokens 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import Future

os.environ.setdefault("SALACHAT_THREADS", "2")
sys.path.insert(0, os.path.dirname(__file__))
import salachat  # noqa: E402, F401  (before torch: OpenMP's wait policy)
import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from salachat.engine import qlinear  # noqa: E402
from salachat.engine.gguf_file import TensorInfo  # noqa: E402
from salachat.engine.threads import configure_threads  # noqa: E402
from salachat.kernels import packed_gemv  # noqa: E402
from salachat.kernels.packed_gemv import numba_gemv, numba_gemv_q8  # noqa: E402

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


def _numba(module, layer, x):
    gemv = module.kernel(layer.qtype, qlinear.PACK_BLOCK)
    pack1 = layer.packed1 if layer.n_packs > 1 else layer.packed0
    buffers = (layer.packed0, pack1, layer.gguf_numbers)
    x32, y = x[0].float().contiguous(), torch.empty(layer.out_features)
    args = [b.data_ptr() for b in buffers] + [x32.data_ptr(), y.data_ptr(), layer.in_features, layer.out_features,
                                                   0, 0, 0.0]

    def run():
        gemv(*args)
        return y[None]
    return run


def shapes(args, report) -> None:
    kernels = ["int8", "fp32", "torch"] if numba_gemv_q8.available() else ["fp32", "torch"]
    print(f"{'kind':5} {'matrix':8} {'shape':>11} | " + " ".join(f"{k + ' us':>9}" for k in kernels)
          + " | " + " ".join(f"{k + ' err':>10}" for k in kernels))
    for qtype in args.kinds:
        for name, (n, k) in SHAPES.items():
            layer = _layer(qtype, n, k)
            x = torch.randn(1, k, generator=torch.Generator().manual_seed(k))
            runs = {"int8": _numba(numba_gemv_q8, layer, x) if "int8" in kernels else None,
                    "fp32": _numba(numba_gemv, layer, x), "torch": lambda: layer._packed_mm(x.bfloat16())}
            want = layer.dequantized(torch.float32).double() @ x[0].double()
            errors = {key: ((runs[key]().double()[0] - want).abs().max() / want.abs().max()).item() for key in kernels}
            times = {key: [] for key in kernels}
            for _ in range(args.rounds):
                for key in kernels:
                    times[key].append(_time(runs[key], args.calls))
            best = {key: min(v) for key, v in times.items()}
            report["rows"].append({"kind": qtype, "matrix": name, "shape": [n, k], "us": times, "best_us": best,
                                   "rel_error": errors})
            print(f"{qtype:5} {name:8} {n:>5}x{k:<5} | " + " ".join(f"{best[key]:9.1f}" for key in kernels)
                  + " | " + " ".join(f"{errors[key]:10.1e}" for key in kernels), flush=True)


def _serve(kinds, module) -> None:
    """Make `packed_gemv.matvec` use this module's kernels for these kinds."""
    for qtype in kinds:
        done = Future()
        done.set_result(module.kernel(qtype, qlinear.PACK_BLOCK))
        packed_gemv._LOADS[qtype] = done
        if module is numba_gemv_q8:
            packed_gemv._ROUNDED.add(qtype)
        else:
            packed_gemv._ROUNDED.discard(qtype)


def decode(args, report) -> None:
    import ask_cpu
    from salachat.engine.generate import prefill
    from salachat.engine.loader import load_model
    from salachat.models import resolve

    path = str(resolve(args.model))
    loaded = load_model(path, device="cpu")
    loaded.model.fused_decode = False  # the matmuls as `matvec` serves them, layer by layer (the whole-step kernel
    # is built with one of them: bench/cpu_decode_ab.py compares it)
    kinds = loaded.model._packed_kinds()
    cache = loaded.new_cache()
    token = int(prefill(loaded.model, ask_cpu.prompt_ids(path, args.decode_tokens), cache).argmax())
    row = {"model": os.path.basename(path), "prompt_tokens": args.decode_tokens, "kinds": sorted(kinds),
           "load_average": os.getloadavg()[0], "tokens_per_second": {}}
    for rnd in range(args.rounds):
        for name, module in (("int8", numba_gemv_q8), ("fp32", numba_gemv)):
            _serve(kinds, module)
            loaded.model(torch.tensor([token]), cache)  # a warm-up token after the switch
            start = time.perf_counter()
            for _ in range(32):
                token = int(loaded.model(torch.tensor([token]), cache)[-1].argmax())
            rate = 32 / (time.perf_counter() - start)
            row["tokens_per_second"].setdefault(name, []).append(rate)
            print(f"decode after {args.decode_tokens} tokens, round {rnd}: {name} {rate:6.1f} tokens/s", flush=True)
    row["load_average_after"] = os.getloadavg()[0]
    report["decode"] = row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kinds", nargs="+", default=["Q4_1", "Q8_0"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--decode-tokens", type=int, default=2048)
    parser.add_argument("--model", default=None)
    parser.add_argument("--no-shapes", action="store_true")
    args = parser.parse_args()
    configure_threads()
    report = {"threads": torch.get_num_threads(), "pack_block": qlinear.PACK_BLOCK, "rows": []}
    print(f"{torch.get_num_threads()} threads, torch's int4 layout {qlinear.PACK_BLOCK} rows a block")
    if not args.no_shapes:
        shapes(args, report)
    if args.decode_tokens and numba_gemv_q8.available():
        decode(args, report)
    where = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(where, exist_ok=True)
    with open(os.path.join(where, "packed_gemv_ab.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
