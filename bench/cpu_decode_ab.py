"""CPU decode of a packed model, three ways in one process: the whole step in one numba call ("fused",
kernels/cpu_decode/numba_step.py), the same kernels called layer by layer from Python ("layers",
`Block.decode_packed`), and layer by layer with torch's flash attention instead of the numba kernel ("torch").

The default model (or --model) reads N tokens of the sample document (2048 by default) on SALACHAT_THREADS
threads (2), then decodes 32 tokens at a time, alternating the three on the same cache, for --rounds rounds
(3). Prints tokens/s and writes $OUT/cpu_decode_ab.json (else bench/results/).

    .venv/bin/python bench/cpu_decode_ab.py [--model PATH.gguf] [--tokens N] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("SALACHAT_THREADS", "2")
sys.path.insert(0, os.path.dirname(__file__))

import salachat  # noqa: E402, F401  (before torch, as the CLI: OpenMP's wait policy)
import torch  # noqa: E402

import ask_cpu  # noqa: E402
from salachat.engine.generate import prefill  # noqa: E402
from salachat.engine.loader import load_model  # noqa: E402
from salachat.kernels import cpu_decode  # noqa: E402
from salachat.models import resolve  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    path = str(resolve(args.model))
    loaded = load_model(path, device="cpu")
    cache = loaded.new_cache()
    token = int(prefill(loaded.model, ask_cpu.prompt_ids(path, args.tokens), cache).argmax())
    report = {"model": os.path.basename(path), "prompt_tokens": args.tokens, "threads": torch.get_num_threads(),
              "load_average": os.getloadavg()[0]}
    for rnd in range(args.rounds):
        for name in ("torch", "layers", "fused"):
            loaded.model.fused_decode = name == "fused"
            if name == "torch":
                cpu_decode._FAILED.append("switched off for the comparison")
            else:
                cpu_decode._FAILED.clear()
            start = time.perf_counter()
            for _ in range(32):
                token = int(loaded.model(torch.tensor([token]), cache)[-1].argmax())
            rate = 32 / (time.perf_counter() - start)
            report.setdefault(f"{name}_tokens_per_second", []).append(rate)
            print(f"round {rnd}: {name:6} {rate:6.1f} tokens/s", flush=True)
    cpu_decode._FAILED.clear()
    loaded.model.fused_decode = True
    report["load_average_after"] = os.getloadavg()[0]
    where = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    with open(os.path.join(where, "cpu_decode_ab.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
