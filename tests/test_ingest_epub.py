"""EPUB read with the standard library, tested on a book built here from a real Debian text."""

from __future__ import annotations

import zipfile
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
from salachat.ingest import IngestError, find_passage, read_paths, render_prompt

GPL3 = Path("/usr/share/common-licenses/GPL-3")  # base-files: on every Debian system


def _chapters() -> list[tuple[str, str]]:
    """The GPL-3 cut at its own headings: (title, body)."""
    if not GPL3.exists():
        pytest.skip(f"{GPL3} is missing (Debian package base-files)")
    lines = GPL3.read_text().split("\n")
    cuts = [("Preamble", 7), ("TERMS AND CONDITIONS", 70), ("How to Apply These Terms", 622)]
    chapters = []
    for index, (title, start) in enumerate(cuts):
        end = cuts[index + 1][1] if index + 1 < len(cuts) else len(lines)
        chapters.append((title, "\n".join(lines[start + 1:end])))
    return chapters


def build_epub(path: Path, chapters: list[tuple[str, str]], *, title: str = "GNU GPL v3",
               container: bool = True, drm: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as book:
        book.writestr("mimetype", "application/epub+zip", compress_type=zipfile.ZIP_STORED)
        if container:
            book.writestr("META-INF/container.xml", (
                '<?xml version="1.0"?><container version="1.0" '
                'xmlns="urn:oasis:names:tc:opendocument:xmlns:container"><rootfiles>'
                '<rootfile full-path="OEBPS/content.opf" media-type="application/oebps-package+xml"/>'
                "</rootfiles></container>"))
        if drm:
            book.writestr("META-INF/encryption.xml", (
                '<encryption xmlns="urn:oasis:names:tc:opendocument:xmlns:container" '
                'xmlns:enc="http://www.w3.org/2001/04/xmlenc#"><enc:EncryptedData><enc:CipherData>'
                '<enc:CipherReference URI="OEBPS/text/ch1.xhtml"/></enc:CipherData></enc:EncryptedData>'
                "</encryption>"))
        # Manifest in reverse order: reading order must come from the spine, not the manifest.
        items = "".join(f'<item id="c{n}" href="text/ch{n}.xhtml" media-type="application/xhtml+xml"/>'
                        for n in reversed(range(1, len(chapters) + 1)))
        spine = "".join(f'<itemref idref="c{n}"/>' for n in range(1, len(chapters) + 1))
        book.writestr("OEBPS/content.opf", (
            '<?xml version="1.0"?><package xmlns="http://www.idpf.org/2007/opf" version="3.0">'
            f'<metadata xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:title>{escape(title)}</dc:title>'
            f"</metadata><manifest>{items}</manifest><spine>{spine}</spine></package>"))
        for n, (chapter_title, body) in enumerate(chapters, start=1):
            paragraphs = "".join(f"<p>{escape(p)}</p>" for p in body.split("\n\n") if p.strip())
            book.writestr(f"OEBPS/text/ch{n}.xhtml", (
                '<?xml version="1.0" encoding="utf-8"?><html xmlns="http://www.w3.org/1999/xhtml">'
                f"<head><title>ch{n}</title><style>p {{ margin: 0 }}</style></head>"
                f"<body><h1>{escape(chapter_title)}</h1>{paragraphs}</body></html>"))
    return path


def test_epub_chapters_follow_the_spine_with_titles_as_anchors(tmp_path):
    doc = read_paths([build_epub(tmp_path / "gpl.epub", _chapters())])[0]
    assert doc.kind == "epub" and doc.title == "GNU GPL v3"
    assert [(s.anchor, s.title) for s in doc.segments] == [
        ("ch.1", "Preamble"), ("ch.2", "TERMS AND CONDITIONS"), ("ch.3", "How to Apply These Terms")]
    assert "[ch.2 TERMS AND CONDITIONS]\n# TERMS AND CONDITIONS" in render_prompt([doc])


def test_epub_known_text_is_in_its_chapter(tmp_path):
    doc = read_paths([build_epub(tmp_path / "gpl.epub", _chapters())])[0]
    assert "The GNU General Public License is a free, copyleft license" in find_passage([doc], "ch.1").text
    terms = find_passage([doc], "chapter 2").text
    assert "0. Definitions." in terms and "15. Disclaimer of Warranty." in terms
    assert "p { margin" not in terms  # styles are not text
    assert find_passage([doc], "How to Apply These Terms").segment.chapter == 3


def test_epub_without_container_falls_back_to_its_package_file(tmp_path):
    doc = read_paths([build_epub(tmp_path / "bare.epub", _chapters(), container=False)])[0]
    assert len(doc.segments) == 3


def test_drm_protected_epub_says_so(tmp_path):
    path = build_epub(tmp_path / "drm.epub", _chapters(), drm=True)
    with pytest.raises(IngestError, match="is DRM-protected, so its text cannot be read; use a DRM-free copy"):
        read_paths([path])


def test_epub_that_is_not_a_zip_is_named(tmp_path):
    path = tmp_path / "fake.epub"
    path.write_text("this is not a zip archive")
    with pytest.raises(IngestError) as caught:
        read_paths([path])
    assert str(caught.value) == (f"{path}: is not a valid EPUB (it is not a zip archive); the EPUB may be "
                                 "damaged: open it in an e-book reader and export it again")
