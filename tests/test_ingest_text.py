"""Plain text, HTML, Markdown and reStructuredText: real Debian texts, section anchors, encodings."""

from __future__ import annotations

import codecs
import itertools
from pathlib import Path

import pytest
from salachat.ingest import IngestError, find_passage, read_paths, render_prompt

GPL3 = Path("/usr/share/common-licenses/GPL-3")  # base-files: on every Debian system
APACHE = Path("/usr/share/common-licenses/Apache-2.0")  # base-files too: a text whose name has a suffix
BZIP2_HTML = Path("/usr/share/doc/bzip2/manual.html")  # apt package bzip2-doc


def _need(path: Path, package: str) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is missing: run `apt-get install -y {package}`")
    return path


def test_debian_license_text_lines_are_found_by_line_anchor():
    doc = read_paths([_need(GPL3, "base-files")])[0]
    assert doc.kind == "text" and doc.meta["encoding"] == "utf-8"
    assert find_passage([doc], "GPL-3:2", context_lines=0).text.strip() == "Version 3, 29 June 2007"
    assert find_passage([doc], "GPL-3 line 73", context_lines=0).text.strip() == "0. Definitions."
    passage = find_passage([doc], "GPL-3:589-590", context_lines=1)
    assert (passage.line_start, passage.line_end) == (588, 591)
    assert "15. Disclaimer of Warranty." in passage.text


def test_long_headingless_text_gets_a_marker_at_least_every_sixty_lines():
    doc = read_paths([_need(GPL3, "base-files")])[0]
    starts = [segment.line_start for segment in doc.segments]
    assert starts[0] == 1 and starts == sorted(starts)
    # A section can run over only to reach the next paragraph break.
    assert all(later - earlier <= 60 + 12 for earlier, later in itertools.pairwise(starts))
    assert f"[GPL-3:{starts[1]}]\n" in render_prompt([doc])


def test_debian_html_manual_becomes_sections_under_its_headings():
    doc = read_paths([_need(BZIP2_HTML, "bzip2-doc")])[0]
    assert doc.kind == "html" and doc.title == "bzip2 and libbzip2, version 1.0.8"
    description = next(segment for segment in doc.segments if segment.title == "2.3. DESCRIPTION")
    assert description.text.startswith("## 2.3. DESCRIPTION")
    assert "bzip2 compresses files using the Burrows-Wheeler block sorting" in " ".join(description.text.split())
    passage = find_passage([doc], description.anchor, context_lines=0)
    assert passage.text == "## 2.3. DESCRIPTION"
    assert "<" not in doc.segments[1].text and "function" not in doc.title


def test_markdown_headings_start_sections_but_not_inside_code_fences(tmp_path):
    path = tmp_path / "guide.md"
    path.write_text("# Guide\n\nIntro.\n\n## Install\n\n```sh\n# not a heading\npip install x\n```\n\n## Use\n\nRun.\n")
    doc = read_paths([path])[0]
    assert doc.title == "Guide"
    assert [(segment.anchor, segment.title) for segment in doc.segments] == [
        ("guide.md:1", "Guide"), ("guide.md:5", "Install"), ("guide.md:12", "Use")]
    assert find_passage([doc], "guide.md:9", context_lines=0).text == "pip install x"


def test_rst_titles_start_sections(tmp_path):
    path = tmp_path / "notes.rst"
    path.write_text("=====\nNotes\n=====\n\nFirst part.\n\nDetails\n-------\n\nMore text.\n")
    doc = read_paths([path])[0]
    assert doc.kind == "rst" and doc.title == "Notes"
    assert [segment.line_start for segment in doc.segments] == [1, 7]


@pytest.mark.parametrize(("encoding", "text"), [
    ("cp1252", "Le cœur a ses raisons que la raison ne connaît point. Déjà vu, naïve café."),
    ("cp1251", "Привет, как дела? Это обычный русский текст для проверки."),
    ("shift_jis", "これは日本語のテキストです。文字化けしないこと。"),
], ids=["western", "cyrillic", "japanese"])
def test_legacy_encodings_decode_without_mojibake(tmp_path, encoding, text):
    path = tmp_path / "legacy.txt"
    path.write_bytes(text.encode(encoding))
    assert read_paths([path])[0].segments[0].text == text


@pytest.mark.parametrize(("bom", "codec"), [
    (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"),
], ids=["utf8-bom", "utf16le-bom", "utf16be-bom"])
def test_byte_order_marks_are_honoured_and_dropped(tmp_path, bom, codec):
    path = tmp_path / "bom.txt"
    path.write_bytes(bom + "Größe ≠ size\nline two".encode(codec))
    assert read_paths([path])[0].segments[0].text == "Größe ≠ size\nline two"


def test_damaged_utf8_is_refused_with_the_line_not_guessed(tmp_path):
    path = tmp_path / "damaged.txt"
    path.write_bytes("naïve café\nsecond line\n".encode() + b"bad \xff byte\n")
    with pytest.raises(IngestError) as caught:
        read_paths([path])
    assert str(caught.value).startswith(f"{path}: is not valid UTF-8 text (bad byte 0xff at line 3")


def test_extensionless_text_file_is_read_as_text(tmp_path):
    path = tmp_path / "NOTES"
    path.write_text("just notes\n")
    assert read_paths([path])[0].kind == "text"


def test_a_text_file_with_a_suffix_of_no_known_format_is_read_as_text(tmp_path):
    doc = read_paths([_need(APACHE, "base-files")])[0]
    assert doc.kind == "text" and "Apache License" in render_prompt([doc])
    log = tmp_path / "server.log"
    log.write_text("12:00 started\n12:01 listening on port 8000\n", encoding="utf-8")
    assert "listening on port 8000" in render_prompt(read_paths([log]))
    blob = tmp_path / "table.dat"
    blob.write_bytes(bytes(range(256)) * 8)  # NUL and control bytes: still refused, naming the suffix
    with pytest.raises(IngestError, match=r"\.dat files are not supported"):
        read_paths([blob])


def test_single_source_file_gets_numbered_lines(tmp_path):
    path = tmp_path / "tool.py"
    path.write_text("import os\n\n\ndef main():\n    return os.getcwd()\n")
    doc = read_paths([path])[0]
    assert doc.kind == "code"
    # The first line carries its number; the rest are found by counting on from it.
    assert "### tool.py\n1| import os\n\n\ndef main():\n    return os.getcwd()" in render_prompt([doc])
    assert find_passage([doc], "tool.py:4", context_lines=0).text == "def main():"
