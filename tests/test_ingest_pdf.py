"""PDF ingestion on real Debian documentation and on PDFs built with known text per page."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import pypdf
import pytest
from salachat.ingest import IngestError, find_passage, read_paths, render_prompt
from salachat.ingest.synthetic_pdf import make_pdf

LIBTASN1_PDF = Path("/usr/share/doc/libtasn1-doc/libtasn1.pdf")  # apt package libtasn1-doc
BZIP2_PDF_GZ = Path("/usr/share/doc/bzip2/manual.pdf.gz")  # apt package bzip2-doc


def _need(path: Path, package: str) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is missing: run `apt-get install -y {package}`")
    return path


@pytest.fixture(scope="module")
def libtasn1():
    return read_paths([_need(LIBTASN1_PDF, "libtasn1-doc")])[0]


def test_debian_pdf_has_one_segment_per_page_with_page_anchors(libtasn1):
    assert libtasn1.kind == "pdf"
    assert libtasn1.meta["pages"] == len(libtasn1.segments) == 36
    assert [segment.anchor for segment in libtasn1.segments[:3]] == ["p.1", "p.2", "p.3"]
    assert libtasn1.pages_without_text == 0
    assert len(libtasn1.content_hash) == 64


def test_debian_pdf_known_sentences_are_on_their_pages(libtasn1):
    # Facts read from the manual itself: page 1 is the title page, page 5 opens chapter 2.
    assert "Abstract Syntax Notation One (ASN.1) library for the GNU system" in libtasn1.segments[0].text
    assert "The parser is case sensitive." in find_passage([libtasn1], "page 5").text
    assert "2.1 ASN.1 syntax" in find_passage([libtasn1], "p. 5").text
    assert "The parser is case sensitive." not in find_passage([libtasn1], "p.6").text


def test_debian_pdf_prompt_marks_each_page_start(libtasn1):
    prompt = render_prompt([libtasn1])
    page5 = prompt.index("[p.5]\n")
    assert prompt.index("[p.4]\n") < page5 < prompt.index("[p.6]\n")
    assert "The parser is case sensitive." in prompt[page5:prompt.index("[p.6]\n")]


def test_gzipped_debian_pdf_is_read_through(tmp_path):
    path = _need(BZIP2_PDF_GZ, "bzip2-doc")
    doc = read_paths([path])[0]
    assert doc.kind == "pdf" and len(doc.segments) == 38 and doc.title == "manual"
    # Chapter 2 opens on page 5; its DESCRIPTION section starts page 6 (typeset "ﬁles" reads "files").
    assert find_passage([doc], "p.5").text.startswith("2. How to use bzip2")
    assert "2.3. DESCRIPTION\nbzip2 compresses files using the Burrows-Wheeler" in find_passage([doc], "p.6").text


def test_pages_without_text_are_counted_not_dropped(tmp_path):
    path = tmp_path / "scanned.pdf"
    path.write_bytes(make_pdf(["Cover text", None, "Back text", None], title="Half Scanned"))
    doc = read_paths([path])[0]
    assert doc.title == "Half Scanned"
    assert doc.pages_without_text == 2
    assert doc.meta["pages_without_text_list"] == [2, 4]
    assert [segment.page for segment in doc.segments] == [1, 2, 3, 4]
    assert "[p.2]\n(no text layer on this page)\n\n[p.3]\nBack text" in render_prompt([doc])


def test_pdf_with_no_text_on_any_page_asks_for_ocr(tmp_path):
    path = tmp_path / "scan.pdf"
    path.write_bytes(make_pdf([None, None, None]))
    with pytest.raises(IngestError) as caught:
        read_paths([path])
    assert str(caught.value) == (f"{path}: has no text layer on any of its 3 pages (a scanned document?); run "
                                 "OCR on it first (e.g. `ocrmypdf in.pdf out.pdf`) and pass the result")


def test_progress_reports_every_page(tmp_path):
    path = tmp_path / "five.pdf"
    path.write_bytes(make_pdf([f"page {n}" for n in range(1, 6)]))
    calls = []
    read_paths([path], progress=lambda label, done, total: calls.append((done, total)))
    assert calls == [(n, 5) for n in range(1, 6)]


def _encrypted(tmp_path: Path, user_password: str) -> Path:
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(make_pdf(["Secret plans on page one"]))))
    writer.encrypt(user_password=user_password, owner_password="owner-only", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    path = tmp_path / f"locked-{len(user_password)}.pdf"
    path.write_bytes(buffer.getvalue())
    return path


def test_pdf_encrypted_with_empty_password_opens_without_one(tmp_path):
    doc = read_paths([_encrypted(tmp_path, "")])[0]
    assert doc.segments[0].text == "Secret plans on page one"


def test_password_protected_pdf_asks_for_password_flag(tmp_path):
    path = _encrypted(tmp_path, "hunter2")
    with pytest.raises(IngestError) as caught:
        read_paths([path])
    assert str(caught.value) == f"{path}: is password-protected; pass its password with --password"


def test_wrong_password_is_reported_and_right_one_opens(tmp_path):
    path = _encrypted(tmp_path, "hunter2")
    with pytest.raises(IngestError, match="the password given does not open this PDF"):
        read_paths([path], password="wrong")
    assert read_paths([path], password="hunter2")[0].segments[0].text == "Secret plans on page one"


def test_damaged_page_is_named_in_the_error(tmp_path):
    pdf = make_pdf(["Page one text", "Page two text", "Page three"])
    # Page 2's content now claims to be deflated; pypdf only logs this and returns no text.
    start = pdf.rindex(b"<< /Length", 0, pdf.index(b"(Page two text)"))
    path = tmp_path / "damaged.pdf"
    path.write_bytes(pdf[:start] + b"<< /Filter /FlateDecode " + pdf[start + 3:])
    with pytest.raises(IngestError) as caught:
        read_paths([path])
    message = str(caught.value)
    assert message.startswith(f"{path}, page 2: this page could not be read")
    assert "qpdf" in message and "\n" not in message


def test_truncated_pdf_names_the_file_and_suggests_repair(tmp_path):
    real = gzip.decompress(_need(BZIP2_PDF_GZ, "bzip2-doc").read_bytes())
    path = tmp_path / "truncated.pdf"
    path.write_bytes(real[: len(real) // 2])
    with pytest.raises(IngestError) as caught:
        read_paths([path])
    assert str(caught.value).startswith(f"{path}: is damaged or not a valid PDF")
    assert "repair it" in str(caught.value)
