"""CPU benchmark: salachat against llama.cpp on the same GGUF files, cores and tokens, in one run.

For each file (the default model SmolLM2-135M Q4_1, and a Q8_0 file made from it with the gguf package):
prefill tokens/s at 2K and 8K tokens, decode tokens/s after the 2K prompt, and peak memory. Each engine
runs in its own process pinned to the same cores (peak RSS is that process's, less what it held before
loading the model); the two alternate, `--rounds` times. Then `salachat ask` on the bundled sample
(load, time to first token, decode) as a user sees it. Prints a table and writes bench/results/ask_cpu.json.

llama.cpp comes from llama-cpp-python, a bench-only dependency that builds from source (about 20 minutes
on 2 cores) and is kept out of CI: `CMAKE_BUILD_PARALLEL_LEVEL=1 pip install llama-cpp-python`.

    .venv/bin/python bench/ask_cpu.py [--model PATH.gguf] [--threads N] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Who kept the light for thirty-one years?"
PROMPTS = tuple(int(n) for n in os.environ.get("ASK_CPU_PROMPTS", "2048,8192").split(","))
DECODE_TOKENS = 64


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def prompt_ids(model: str, n: int) -> list[int]:
    """n tokens of real text (the sample document, repeated), tokenised by the file's own vocabulary."""
    from salachat.engine.loader import load_tokenizer

    from salachat.documents import load_documents

    tokenizer, _ = load_tokenizer(model)
    text = load_documents([ROOT / "assets" / "sample.pdf"]).prompt_text
    ids = tokenizer.encode(text)
    return (ids * (n // len(ids) + 1))[:n]


def worker_salachat(model: str, threads: int, ids: list[int]) -> dict:
    os.environ["SALACHAT_THREADS"] = str(threads)
    import salachat  # noqa: F401  (first, as the CLI does: it sets OpenMP's wait policy before torch loads)
    import torch

    import salachat.engine.gguf_file
    import salachat.engine.models.llama
    import salachat.engine.qlinear
    import salachat.engine.tokenizer  # noqa: F401  (code, not model: imported before the baseline)
    from salachat.engine.generate import prefill
    from salachat.engine.loader import load_model

    base = _rss()
    loaded = load_model(model, device="cpu")
    result = {"threads": torch.get_num_threads(), "model_rss_bytes": _rss() - base}
    for n in PROMPTS:
        cache = loaded.new_cache()
        start = time.perf_counter()
        logits = prefill(loaded.model, ids[:n], cache)
        result[f"prefill_{n}_tokens_per_second"] = n / (time.perf_counter() - start)
        if n == PROMPTS[0]:
            token = int(logits.argmax())
            start = time.perf_counter()
            for _ in range(DECODE_TOKENS):
                token = int(loaded.model(torch.tensor([token]), cache)[-1].argmax())
            result["decode_tokens_per_second"] = DECODE_TOKENS / (time.perf_counter() - start)
        del cache
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return result


def worker_llama_cpp(model: str, threads: int, ids: list[int]) -> dict:
    import llama_cpp.llama_cpp as llama_cpp_c
    import numpy as np
    from llama_cpp import Llama

    if os.environ.get("ASK_CPU_LLAMA_EXTRA_BUFTS", "0") == "0":
        # llama-cpp-python 0.3.36's AMX matmul (an "extra buffer type") segfaults on some AMX CPUs (this
        # one: SIGSEGV at any prompt length); off by default, which also turns off llama.cpp's weight
        # repacking. ASK_CPU_LLAMA_EXTRA_BUFTS=1 where it works
        default_params = llama_cpp_c.llama_model_default_params

        def params():
            p = default_params()
            p.use_extra_bufts = False
            return p

        llama_cpp_c.llama_model_default_params = params
    base = _rss()
    llm = Llama(model_path=model, n_ctx=max(PROMPTS) + DECODE_TOKENS + 8, n_threads=threads,
                n_threads_batch=threads, n_batch=512, n_ubatch=512, verbose=False)
    def last_token(llm) -> int:  # the greedy next token from the last position's logits
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))))

    result = {"threads": threads, "model_rss_bytes": _rss() - base,
              "extra_buffer_types": os.environ.get("ASK_CPU_LLAMA_EXTRA_BUFTS", "0") != "0"}
    for n in PROMPTS:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids[:n])
        result[f"prefill_{n}_tokens_per_second"] = n / (time.perf_counter() - start)
        if n == PROMPTS[0]:
            token = last_token(llm)
            start = time.perf_counter()
            for _ in range(DECODE_TOKENS):
                llm.eval([token])
                token = last_token(llm)
            result["decode_tokens_per_second"] = DECODE_TOKENS / (time.perf_counter() - start)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return result


def make_q8_0(source: Path, target: Path) -> Path:
    """The same model with every Q4/Q8 matrix requantised to Q8_0 (through fp32), metadata copied."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize, quantize

    if target.is_file():
        return target
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(target), arch=reader.fields["general.architecture"].contents())
    writer.kv_data[0].clear()
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.file_type":
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), value_type, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for tensor in reader.tensors:
        shape = tuple(int(x) for x in reversed(tensor.shape))
        values = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        if len(shape) == 2:
            packed = quantize(values, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(tensor.name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def run_worker(engine: str, model: Path, threads: int, cores: set[int], ids_file: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--model", str(model), "--threads", str(threads),
           "--ids", str(ids_file)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          preexec_fn=lambda: os.sched_setaffinity(0, cores))
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def ask_as_a_user(model: str) -> dict:
    """`salachat ask` on the sample, in process: load, read, first token, decode."""
    from salachat.engine.generate import Sampling, Stats

    from salachat.conversation import Conversation
    from salachat.documents import load_documents
    from salachat.models import open_model

    start = time.perf_counter()
    loaded = open_model(model, device="cpu")
    load_s = time.perf_counter() - start
    conversation = Conversation(loaded)
    doc_tokens = conversation.set_documents(load_documents([ROOT / "assets" / "sample.pdf"]).prompt_text)
    start = time.perf_counter()
    conversation.read()
    read_s = time.perf_counter() - start
    stats = Stats()
    answer = "".join(conversation.ask(QUESTION, Sampling(max_tokens=48), stats=stats))
    return {"model": loaded.model_id, "load_seconds": load_s, "document_tokens": doc_tokens,
            "read_tokens_per_second": doc_tokens / read_s, **stats.to_dict(), "answer": answer}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="a GGUF file (default: the installed default model)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of both engines (default: salachat's pick for the cores allowed and the load)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--worker", choices=["salachat", "llama.cpp"], help=argparse.SUPPRESS)
    parser.add_argument("--ids", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        ids = json.loads(Path(args.ids).read_text())
        work = worker_salachat if args.worker == "salachat" else worker_llama_cpp
        print(json.dumps(work(args.model, args.threads, ids)))
        return

    from salachat.engine.threads import pick_threads

    from salachat.models import resolve

    cores = os.sched_getaffinity(0)
    threads = args.threads or pick_threads(len(cores))
    q4_1 = resolve(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        q8_0 = make_q8_0(q4_1, Path(tmp) / (q4_1.stem.rsplit(".", 1)[0] + ".Q8_0.gguf"))
        ids_file = Path(tmp) / "ids.json"
        ids_file.write_text(json.dumps(prompt_ids(str(q4_1), max(PROMPTS))))
        files = {"Q4_1": q4_1, "Q8_0": q8_0}
        runs: dict[str, dict[str, list[dict]]] = {kind: {"salachat": [], "llama.cpp": []} for kind in files}
        for _ in range(args.rounds):
            for kind, path in files.items():
                for engine in ("salachat", "llama.cpp"):
                    runs[kind][engine].append(run_worker(engine, path, threads, cores, ids_file))
        sizes = {kind: path.stat().st_size for kind, path in files.items()}
    ask = ask_as_a_user(args.model)

    def best(rows: list[dict], key: str) -> float | None:
        values = [r[key] for r in rows if key in r]
        return (min if "rss" in key else max)(values) if values else None

    keys = [f"prefill_{n}_tokens_per_second" for n in PROMPTS] + ["decode_tokens_per_second", "peak_rss_bytes"]
    print(f"CPU, {len(cores)} cores allowed, {threads} threads, {args.rounds} round(s), load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    print(f"  {'file':<6} {'measure':<32} {'salachat':>12} {'llama.cpp':>12}")
    for kind in files:
        for key in keys:
            ours, theirs = best(runs[kind]["salachat"], key), best(runs[kind]["llama.cpp"], key)

            def show(v, key=key):
                if v is None:
                    return "-"
                return f"{v / 2**20:,.0f} MiB" if "rss" in key else f"{v:,.1f}"

            print(f"  {kind:<6} {key:<32} {show(ours):>12} {show(theirs):>12}")
        print(f"  {kind:<6} {'GGUF file size':<32} {sizes[kind] / 2**20:>8,.0f} MiB")
        for engine in ("salachat", "llama.cpp"):
            errors = [r["error"] for r in runs[kind][engine] if "error" in r]
            if errors:
                print(f"  {kind:<6} {engine} failed: {errors[0]}")
    print(f"ask on assets/sample.pdf: load {ask['load_seconds']:.2f} s, read {ask['read_tokens_per_second']:.0f} "
          f"tok/s, first token {ask['time_to_first_token_seconds']:.3f} s, decode "
          f"{ask['decode_tokens_per_second']} tok/s; answer {ask['answer'].strip()[:80]!r}")
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": len(cores), "threads": threads,
                    "load_average_at_end": os.getloadavg()[0]},
        "rounds": args.rounds, "prompt_tokens": list(PROMPTS), "decode_tokens": DECODE_TOKENS,
        "gguf_bytes": sizes, "runs": runs, "ask": ask,
    }
    out = ROOT / "bench" / "results" / "ask_cpu.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
