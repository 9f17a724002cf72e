"""CPU benchmark of `salachat ask` on the bundled sample: load, time to first token, prefill and decode speed.

Baseline in the same run: decoding by recomputing the whole sequence each step (no cache), the reference
path the cached decode must beat. Prints a table and writes bench/results/ask_cpu.json.

    .venv/bin/python bench/ask_cpu.py [--model smollm2] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from salachat.engine.generate import Sampling, Stats
from salachat.engine.loader import load_model
from salachat.conversation import Conversation
from salachat.documents import load_documents

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Who kept the light for thirty-one years?"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    loaded = load_model(args.model, device="cpu")
    load_s = time.perf_counter() - t0
    documents = load_documents([ROOT / "assets" / "sample.pdf"])

    conversation = Conversation(loaded)
    doc_tokens = conversation.set_documents(documents.prompt_text)
    t1 = time.perf_counter()
    conversation.read()
    read_s = time.perf_counter() - t1
    stats = Stats()
    t2 = time.perf_counter()
    answer = "".join(conversation.ask(QUESTION, Sampling(max_tokens=args.max_tokens), stats=stats))
    ask_s = time.perf_counter() - t2

    # Baseline: the same greedy decode without a cache, recomputing the full sequence for each token.
    ids = loaded.tokenizer.encode_chat([{"role": "user", "content": QUESTION}])
    steps = 8
    t3 = time.perf_counter()
    for _ in range(steps):
        token = int(loaded.model(torch.tensor(ids), loaded.new_cache())[-1].argmax())
        ids.append(token)
    recompute_tps = steps / (time.perf_counter() - t3)

    s = stats.to_dict()
    rows = [
        ("model load (s)", f"{load_s:.2f}"),
        ("document tokens", f"{doc_tokens}"),
        ("read: prefill tokens/s", f"{doc_tokens / read_s:.1f}"),
        ("time to first token after the question (s)", f"{s['time_to_first_token_seconds']:.3f}"),
        ("decode tokens/s (cached)", f"{s['decode_tokens_per_second']}"),
        ("decode tokens/s (baseline: recompute, no cache)", f"{recompute_tps:.2f}"),
        ("time to first token from the start, read included (s)", f"{read_s + s['time_to_first_token_seconds']:.2f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"ask on assets/sample.pdf, {loaded.model_id}, CPU ({torch.get_num_threads()} threads)")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"  answer: {answer.strip()[:120]!r}")
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "model": loaded.model_id, "load_seconds": load_s, "document_tokens": doc_tokens,
        "read_seconds": read_s, "read_tokens_per_second": doc_tokens / read_s, "ask_seconds": ask_s,
        "baseline_recompute_decode_tokens_per_second": recompute_tps, **s, "answer": answer,
    }
    out = ROOT / "bench" / "results" / "ask_cpu.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
