"""Ingestion throughput on this machine: PDF pages per second (a generated 600-page PDF and, when
installed, a Debian manual) and repository files per second (the venv's torch package, ~14k files);
the tokens line anchors cost against a number on every line (the former rendering, measured in the same
run); and peak memory and time of huge or hostile inputs, each read in a child process whose peak RSS
getrusage reports (a 200 MB text, a 50 MB HTML page, a 3 MB .txt.gz bomb, an EPUB of huge chapters).

    .venv/bin/python bench/ingest_bench.py [--pages 600] [--repo PATH] [--no-hostile] [--out bench/results/ingest.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

from salachat.ingest import estimate_tokens, find_passage, read_paths, render_prompt, summarize
from salachat.ingest.render import render_segment
from salachat.ingest.repo import read_repo, walk_repo
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
    doc = read_repo(root, str(root))  # no token budget: the whole tree, as a throughput figure
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
    plain = sum(estimate_tokens(f"### {seg.path}\n{seg.text}") for seg in doc.segments)
    every_line = sum(estimate_tokens(f"### {seg.path}\n" + "\n".join(
        f"{n}| {line}" for n, line in enumerate(seg.text.split("\n"), 1))) for seg in doc.segments)
    sparse = sum(estimate_tokens(render_segment(doc, seg)) for seg in doc.segments)
    anchors = {"tokens_without_numbers": plain, "tokens_number_on_every_line": every_line,
               "tokens_sparse_anchors": sparse}
    anchors["anchor_tokens_every_line"] = every_line - plain
    anchors["anchor_tokens_sparse"] = anchors["tokens_sparse_anchors"] - plain
    return {"case": f"repo {root.name}", "files_read": len(doc.segments), "files_walked": len(files),
            "anchors": anchors,
            "skipped": len(doc.skipped), "text_mb": round(read_bytes / 1e6, 1),
            "walk_seconds": round(walk_seconds, 3), "seconds": round(seconds, 3),
            "files_per_s": round(len(doc.segments) / seconds, 1),
            "mb_per_s": round(read_bytes / 1e6 / seconds, 1), "render_seconds": round(render_seconds, 3),
            "prompt_chars": len(prompt), "estimated_tokens": summary.tokens,
            "find_passage_ms": round(find_ms, 2)}


_MEASURE = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
result = subprocess.run(sys.argv[1:], capture_output=True, text=True, check=False)
print(json.dumps({"rc": result.returncode, "seconds": round(time.perf_counter() - started, 2),
                  "peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024,
                  "said": (result.stdout + result.stderr).strip().splitlines()[-1:]}))
"""
_READ = """
import sys
from salachat.ingest import IngestError, read_paths, render_prompt
try:
    docs = read_paths([sys.argv[1]])
    print(f"read: {len(render_prompt(docs)):,} characters of prompt")
except IngestError as error:
    print(f"refused: {error}")
"""


def _hostile_inputs(folder: Path) -> list[tuple[str, Path]]:
    line = b"the keeper climbed the stairs at dusk and lit the great lamp again tonight\n"
    text = folder / "huge.txt"
    with text.open("wb") as handle:
        for _ in range(200 * 10**6 // (len(line) * 10000)):
            handle.write(line * 10000)
    html = folder / "page.html"
    with html.open("wb") as handle:
        handle.write(b"<html><head><meta charset='utf-8'><title>page</title></head><body>")
        for _ in range(50 * 10**6 // (40 * 10000)):
            handle.write(b"<p><b>word</b> <i>and</i> more</p>\n" * 10000)
    bomb = folder / "bomb.txt.gz"
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    with bomb.open("wb") as handle:
        for _ in range(3000):  # 3 GB of one letter, about 3 MB packed
            handle.write(packer.compress(b"a" * (1 << 20)))
        handle.write(packer.flush())
    book = folder / "chapters.epub"
    with zipfile.ZipFile(book, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("META-INF/container.xml", '<container><rootfiles><rootfile full-path="c.opf"/>'
                         "</rootfiles></container>")
        items = "".join(f'<item id="c{n}" href="c{n}.xhtml"/>' for n in range(24))
        refs = "".join(f'<itemref idref="c{n}"/>' for n in range(24))
        archive.writestr("c.opf", f"<package><manifest>{items}</manifest><spine>{refs}</spine></package>")
        for n in range(24):
            archive.writestr(f"c{n}.xhtml", b"<html><body><p>" + b"word " * (6 << 20) + b"</p></body></html>")
    return [("200 MB text", text), ("50 MB HTML", html), (f"{bomb.stat().st_size / 1e6:.1f} MB .txt.gz bomb", bomb),
            (f"{book.stat().st_size / 1e3:.0f} KB EPUB of 30 MB chapters", book)]


def bench_hostile() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, path in _hostile_inputs(Path(folder)):
            done = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-c", _READ, str(path)],
                                  capture_output=True, text=True, check=True, cwd=ROOT)
            row = {"case": label, "bytes_on_disk": path.stat().st_size, **json.loads(done.stdout)}
            rows.append(row)
    return rows


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
    parser.add_argument("--no-hostile", action="store_true", help="skip the huge and hostile inputs")
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

    hostile = [] if args.no_hostile else bench_hostile()

    print(f"{'case':<36} {'units':>8} {'seconds':>8} {'rate':>14}")
    for row in results:
        if "pages" in row:
            print(f"{row['case']:<36} {row['pages']:>8} {row['seconds']:>8} {row['pages_per_s']:>9} pages/s"
                  f"  (unchanged re-read from the cache {row['unchanged_reread_seconds']} s)")
        else:
            print(f"{row['case']:<36} {row['files_read']:>8} {row['seconds']:>8} {row['files_per_s']:>9} files/s"
                  f"  ({row['mb_per_s']} MB/s, walk {row['walk_seconds']} s, {row['skipped']} skipped,"
                  f" render {row['render_seconds']} s, find_passage {row['find_passage_ms']} ms)")
            anchors = row["anchors"]
            print(f"{'':<36} line anchors: {anchors['anchor_tokens_sparse']:,} tokens sparse vs "
                  f"{anchors['anchor_tokens_every_line']:,} with a number on every line")
    if hostile:
        print(f"\n{'huge or hostile input':<36} {'peak MiB':>9} {'seconds':>8}  outcome")
        for row in hostile:
            print(f"{row['case']:<36} {row['peak_mib']:>9} {row['seconds']:>8}  {' '.join(row['said'])[:110]}")
    report = {"machine": {"cpu": _cpu_model(), "cores": os.cpu_count(),
                          "python": platform.python_version()},
              "results": results, "hostile": hostile}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
