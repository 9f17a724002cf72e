"""Peak memory of reading huge inputs, measured as the peak RSS of a child process
(getrusage(RUSAGE_CHILDREN) in a small wrapper process, so nothing else this test run started counts).
The bound is 2 GB beyond the model; reading or refusing involves no model, so all of it must fit there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOUND_BYTES = 2 * 1024**3
_MEASURE = (
    "import json, resource, subprocess, sys\n"
    "result = subprocess.run(sys.argv[1:], capture_output=True, text=True, check=False)\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"  # Linux reports KiB
    "print(json.dumps({'rc': result.returncode, 'peak': peak, 'stdout': result.stdout, 'stderr': result.stderr}))\n"
)


def _measured(command: list[str], home: Path) -> dict:
    env = {**os.environ, "SALACHAT_HOME": str(home), "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT, check=True)
    return json.loads(done.stdout)


def _write_text(path: Path, size: int) -> None:
    line = b"the keeper climbed the stairs at dusk and lit the great lamp again tonight\n"
    block = line * (1 << 20 // len(line) + 1)
    with path.open("wb") as handle:
        written = 0
        while written < size:
            handle.write(block)
            written += len(block)


def test_a_200_mb_text_file_is_refused_through_salachat_ingest_in_bounded_memory(tmp_path):
    path = tmp_path / "huge.txt"
    _write_text(path, 200 * 10**6)
    entry = Path(sys.executable).parent / "salachat"
    command = [str(entry)] if entry.exists() else [sys.executable, "-m", "salachat"]
    result = _measured([*command, "ingest", str(path)], tmp_path / "home")
    assert result["rc"] == 3, result
    lines = result["stderr"].strip().split("\n")  # the plan of what would be read, then the refusal
    assert "huge.txt: is too long to read: 200." in lines[-1] and "more than the 4,000,000 tokens" in lines[-1]
    assert "does NOT fit" in lines[-2]
    assert "Traceback" not in result["stderr"]
    assert result["peak"] < BOUND_BYTES, f"peak RSS {result['peak'] / 2**20:.0f} MiB"
    print(f"salachat ingest of 200 MB refused; peak RSS {result['peak'] / 2**20:.0f} MiB")


def test_the_largest_text_salachat_reads_fits_the_bound(tmp_path):
    """Just under the hard ceiling of tokens: read, segmented and rendered whole, under 2 GB."""
    path = tmp_path / "long.txt"
    _write_text(path, 60 * 10**6)  # ~15M tokens, under the 16M ceiling
    script = ("import sys\nfrom salachat.ingest import HARD_MAX_TOKENS, read_paths, render_prompt\n"
              "docs = read_paths([sys.argv[1]], max_tokens=HARD_MAX_TOKENS)\n"
              "print(len(render_prompt(docs)), len(docs[0].segments))\n")
    result = _measured([sys.executable, "-c", script, str(path)], tmp_path / "home")
    assert result["rc"] == 0, result["stderr"]
    chars, segments = map(int, result["stdout"].split())
    assert chars > 60 * 10**6 and segments > 5_000  # a marker at least every 120 lines
    assert result["peak"] < BOUND_BYTES, f"peak RSS {result['peak'] / 2**20:.0f} MiB"
    print(f"60 MB read whole; peak RSS {result['peak'] / 2**20:.0f} MiB")


def test_an_epub_of_huge_chapters_is_refused_in_bounded_memory(tmp_path):
    import zipfile

    book = tmp_path / "chapters.epub"
    with zipfile.ZipFile(book, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("META-INF/container.xml", '<container><rootfiles><rootfile full-path="c.opf"/>'
                         "</rootfiles></container>")
        items = "".join(f'<item id="c{n}" href="c{n}.xhtml"/>' for n in range(4))
        refs = "".join(f'<itemref idref="c{n}"/>' for n in range(4))
        archive.writestr("c.opf", f"<package><manifest>{items}</manifest><spine>{refs}</spine></package>")
        for n in range(4):
            archive.writestr(f"c{n}.xhtml", b"<html><body><p>" + b"word " * (6 << 20) + b"</p></body></html>")
    assert book.stat().st_size < 2_000_000  # 120 MB of chapters in a small file
    script = ("import sys\nfrom salachat.ingest import TooLarge, read_paths\n"
              "try:\n    read_paths([sys.argv[1]])\nexcept TooLarge as error:\n    print(error)\n")
    result = _measured([sys.executable, "-c", script, str(book)], tmp_path / "home")
    assert "chapters.epub: is too long to read" in result["stdout"], result
    assert result["peak"] < 512 * 2**20, f"peak RSS {result['peak'] / 2**20:.0f} MiB"
    print(f"EPUB of 4 chapters of 30 MB refused; peak RSS {result['peak'] / 2**20:.0f} MiB")
