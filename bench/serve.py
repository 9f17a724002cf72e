"""`salachat serve` with a long document asked twice: how much sooner the second question is answered.

A document of --tokens tokens (the repository's own text, cut to length with the model's tokenizer) is sent
twice, with two different questions, the way any OpenAI client sends it: the whole document in the first
user message each time. Measured in one run, time to the first answer token (TTFT) from the request:

  first        the first question: the server reads the document
  second       the second question on the same server: it branches from the reading it kept
  re-reading   the second question on a server started with --no-reuse (what a server without state
               reuse does for every question: a re-reading server keeps nothing, so its second request
               costs what its first does)

The servers run one after the other (never both reading at once), each a real `salachat serve` subprocess.

    .venv/bin/python bench/serve.py                       # 65,536 tokens, the default model on the CPU
    .venv/bin/python bench/serve.py --tokens 8192 --out /tmp/serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ("What does the engine keep for each Lightning layer?",
             "Which exit code means that a session is missing?")


def document_of(tokens: int, model: str | None) -> tuple[str, int]:
    """The repository's markdown and Python, concatenated and cut to `tokens` tokens."""
    from salachat.models import open_tokenizer

    tokenizer, _ = open_tokenizer(model)
    files = sorted(ROOT.glob("docs/*.md")) + sorted(ROOT.glob("engine/**/*.py")) + sorted(ROOT.glob("salachat/**/*.py"))
    files += sorted(ROOT.glob("kernels/**/*.py")) + sorted(ROOT.glob("ingest/**/*.py"))
    parts, ids = [], []
    while len(ids) < tokens:  # a small repository is read round again
        for path in files:
            parts.append(f"## {path.relative_to(ROOT)}\n\n{path.read_text(encoding='utf-8', errors='replace')}\n")
            ids += tokenizer.encode(parts[-1])
            if len(ids) >= tokens:
                break
    text = tokenizer.decode(ids[:tokens])
    return text, len(tokenizer.encode(text))


class Server:
    def __init__(self, args: list[str]):
        env = {**os.environ, "COLUMNS": "200"}
        self.proc = subprocess.Popen([sys.executable, "-m", "salachat", "serve", "--port", "0", *args], cwd=ROOT,
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = None
        lines = []
        for line in self.proc.stderr:
            lines.append(line)
            if " at http://" in line:
                self.url = line.split(" at ")[1].split()[0]
                break
        if self.url is None:
            raise SystemExit("salachat serve did not start:\n" + "".join(lines))
        self.model = httpx.get(self.url + "/models", timeout=30).json()["data"][0]["id"]

    def ask(self, document: str, question: str, max_tokens: int) -> dict:
        body = {"model": self.model, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": f"<documents>\n{document}\n</documents>\n\n{question}"}]}
        started = time.perf_counter()
        first = None
        usage = {}
        pieces = []
        with httpx.stream("POST", self.url + "/chat/completions", json=body, timeout=3600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                event = json.loads(line[5:])
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        first = first or time.perf_counter()
                        pieces.append(choice["delta"]["content"])
        ended = time.perf_counter()
        return {"ttft_seconds": round((first or ended) - started, 3), "total_seconds": round(ended - started, 3),
                "prompt_tokens": usage.get("prompt_tokens"),
                "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
                "answer": "".join(pieces)}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _gpu(device: str | None) -> str:
    import torch

    return f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() and device != "cpu" else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--model", default=None, help="what `salachat serve --model` takes (default: the default model)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--state-gb", type=float, default=7.0, help="the reusing server's --state-gb")
    parser.add_argument("--device", default=None, help="what `salachat serve --device` takes")
    parser.add_argument("--warmup-tokens", type=int, default=0,
                        help="first ask each server both questions about another document this long (a GPU "
                             "compiles its kernels for each shape on first use; that time belongs to no request)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json")
    args = parser.parse_args()

    document, document_tokens = document_of(args.tokens, args.model)
    warmup = document_of(args.warmup_tokens, args.model)[0][::-1] if args.warmup_tokens else None
    model_args = (["--model", args.model] if args.model else []) + (["--device", args.device] if args.device else [])
    results = {}
    server = Server([*model_args, "--state-gb", str(args.state_gb)])
    try:
        if warmup:  # both paths: a reading, then a branch from it
            server.ask(warmup, QUESTIONS[0], args.max_tokens)
            server.ask(warmup, QUESTIONS[1], args.max_tokens)
        results["first"] = server.ask(document, QUESTIONS[0], args.max_tokens)
        results["second"] = server.ask(document, QUESTIONS[1], args.max_tokens)
    finally:
        server.stop()
    model = server.model
    server = Server([*model_args, "--no-reuse"])
    try:
        if warmup:  # its one path: a whole reading
            server.ask(warmup, QUESTIONS[1], args.max_tokens)
        results["re-reading"] = server.ask(document, QUESTIONS[1], args.max_tokens)
    finally:
        server.stop()

    second = results["second"]["ttft_seconds"]
    summary = {
        "model": model,
        "document_tokens": document_tokens,
        "max_tokens": args.max_tokens,
        "warmup_tokens": args.warmup_tokens,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_implementation()} "
                   f"{platform.python_version()}" + _gpu(args.device),
        "results": results,
        "second_sooner_than_first": round(results["first"]["ttft_seconds"] / second, 1),
        "second_sooner_than_rereading": round(results["re-reading"]["ttft_seconds"] / second, 1),
        "same_answer_as_rereading": results["second"]["answer"] == results["re-reading"]["answer"],
    }
    print(f"{document_tokens:,}-token document, {model}")
    print(f"{'request':<12} {'TTFT s':>9} {'total s':>9} {'prompt':>8} {'cached':>8}")
    for name, row in results.items():
        print(f"{name:<12} {row['ttft_seconds']:>9.3f} {row['total_seconds']:>9.3f} {row['prompt_tokens']:>8} "
              f"{row['cached_tokens']:>8}")
    print(f"second question answered {summary['second_sooner_than_first']}x sooner than the first, "
          f"{summary['second_sooner_than_rereading']}x sooner than by a re-reading server "
          f"(same answer: {summary['same_answer_as_rereading']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
