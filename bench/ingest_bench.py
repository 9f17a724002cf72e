"""Ingestion throughput on this machine: PDF pages per second (a generated 600-page PDF and, when
installed, a Debian manual) and repository files per second (the venv's torch package, ~14k files).

    .venv/bin/python bench/ingest_bench.py [--pages 600] [--repo PATH] [--out bench/results/ingest.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from salachat.ingest import find_passage, read_paths, render_prompt, summarize
from salachat.ingest.repo import walk_repo
from salachat.ingest.synthetic_pdf import make_pdf

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_PDF = Path("/usr/share/doc/libtasn1-doc/libtasn1.pdf")
PANGRAM = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches"
WORDS = [*PANGRAM.split(), "and", "packing", "jugs", "of", "liquor"]


def _page_text(number: int) -> str:
    lines = []
    for row in range(45):  # a dense page: ~45 lines of ~80 characters, like a printed book
        start = (number * 7 + row * 3) % len(WORDS)
        words = [WORDS[(start + k) % len(WORDS)] for k in range(14)]
        lines.append(f"{number}.{row} " + " ".join(words))
    return "\n".join(lines)


def bench_pdf(path: Path, label: str) -> dict:
    started = time.perf_counter()
    doc = read_paths([path])[0]
    seconds = time.perf_counter() - started
    pages = len(doc.segments)
    with tempfile.TemporaryDirectory() as cache_dir:
        read_paths([path], cache_dir=Path(cache_dir))
        started = time.perf_counter()
        cached = read_paths([path], cache_dir=Path(cache_dir))[0]
        cached_seconds = time.perf_counter() - started
        assert cached.meta.get("cached"), "the second read should come from the cache"
    return {"case": label, "pages": pages, "bytes": path.stat().st_size, "seconds": round(seconds, 3),
            "pages_per_s": round(pages / seconds, 1), "chars": doc.text_chars,
            "unchanged_reread_seconds": round(cached_seconds, 4)}


def bench_repo(root: Path) -> dict:
    started = time.perf_counter()
    files, _ = walk_repo(root)
    walk_seconds = time.perf_counter() - started
    started = time.perf_counter()
    doc = read_paths([root])[0]
    seconds = time.perf_counter() - started
    read_bytes = sum(len(segment.text.encode()) for segment in doc.segments)
    started = time.perf_counter()
    prompt = render_prompt([doc])
    render_seconds = time.perf_counter() - started
    summary = summarize([doc])
    middle = doc.segments[len(doc.segments) // 2]
    started = time.perf_counter()
    for line in range(1, 101):
        find_passage([doc], f"{middle.path}:{line}")
    find_ms = (time.perf_counter() - started) * 10  # per call, in ms
    return {"case": f"repo {root.name}", "files_read": len(doc.segments), "files_walked": len(files),
            "skipped": len(doc.skipped), "text_mb": round(read_bytes / 1e6, 1),
            "walk_seconds": round(walk_seconds, 3), "seconds": round(seconds, 3),
            "files_per_s": round(len(doc.segments) / seconds, 1),
            "mb_per_s": round(read_bytes / 1e6 / seconds, 1), "render_seconds": round(render_seconds, 3),
            "prompt_chars": len(prompt), "estimated_tokens": summary.tokens,
            "find_passage_ms": round(find_ms, 2)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=600)
    torch_dir = next((Path(p) / "torch" for p in sys.path if (Path(p) / "torch" / "__init__.py").exists()), None)
    parser.add_argument("--repo", type=Path, default=torch_dir)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.json")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as folder:
        pdf = Path(folder) / "generated.pdf"
        pdf.write_bytes(make_pdf([_page_text(n) for n in range(1, args.pages + 1)], title="Generated"))
        results.append(bench_pdf(pdf, f"generated PDF, {args.pages} pages"))
    if DEBIAN_PDF.exists():
        results.append(bench_pdf(DEBIAN_PDF, "Debian libtasn1.pdf (pdfTeX)"))
    if args.repo is not None:
        results.append(bench_repo(args.repo))

    print(f"{'case':<36} {'units':>8} {'seconds':>8} {'rate':>14}")
    for row in results:
        if "pages" in row:
            print(f"{row['case']:<36} {row['pages']:>8} {row['seconds']:>8} {row['pages_per_s']:>9} pages/s"
                  f"  (unchanged re-read from the cache {row['unchanged_reread_seconds']} s)")
        else:
            print(f"{row['case']:<36} {row['files_read']:>8} {row['seconds']:>8} {row['files_per_s']:>9} files/s"
                  f"  ({row['mb_per_s']} MB/s, walk {row['walk_seconds']} s, {row['skipped']} skipped,"
                  f" render {row['render_seconds']} s, find_passage {row['find_passage_ms']} ms)")
    report = {"machine": {"cpu": _cpu_model(), "cores": os.cpu_count(),
                          "python": platform.python_version()},
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
