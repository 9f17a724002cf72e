"""Every broken input gives one clear line naming the file and the next step, never a traceback.
The corpus is tests/data/broken (regenerate with tests/data/make_broken.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from salachat.ingest import IngestError, read_paths

BROKEN = Path(__file__).parent / "data" / "broken"

EXPECTED = {
    "truncated.pdf": "is damaged or not a valid PDF",
    "zero_bytes.txt": "is empty (0 bytes); check that the file was saved or copied fully",
    "binary_named.txt": "looks like a binary file, not text",
    "invalid_utf8.md": "is not valid UTF-8 text (bad byte 0xc3 at line 4, byte 35)",
    "not_a_pdf.pdf": "is not a PDF (it does not start with %PDF)",
    "not_a_zip.epub": "is not a valid EPUB (it is not a zip archive)",
    "damaged_page.pdf": "this page could not be read",
    "password.pdf": "is password-protected; pass its password with --password",
    "letter.docx": ".docx files are not supported; supported: .pdf, .epub, .txt, .md, .rst, .html",
    "truncated.txt.gz": "is not a valid gzip file",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_broken_input_gives_one_line_naming_the_file(name):
    path = BROKEN / name
    with pytest.raises(IngestError) as caught:
        read_paths([path])
    message = str(caught.value)
    assert message.startswith(str(path)), message
    assert EXPECTED[name] in message
    assert "\n" not in message and "Traceback" not in message
    assert "; " in message  # every message says what to do next


def test_damaged_page_error_names_the_page():
    with pytest.raises(IngestError) as caught:
        read_paths([BROKEN / "damaged_page.pdf"])
    assert caught.value.page == 2
    assert str(caught.value).startswith(f"{BROKEN / 'damaged_page.pdf'}, page 2: ")


def test_password_from_the_user_opens_the_locked_corpus_pdf():
    doc = read_paths([BROKEN / "password.pdf"], password="open sesame")[0]
    assert doc.segments[1].text == "Page 2 of a report."


def test_missing_path_is_named():
    with pytest.raises(IngestError, match=r"^nowhere/book\.pdf: no such file or folder; check the path$"):
        read_paths(["nowhere/book.pdf"])


def test_unreadable_file_reports_permissions(monkeypatch, tmp_path):
    # Tests run as root, where chmod cannot deny reading: make the read itself fail.
    path = tmp_path / "private.txt"
    path.write_text("secret")
    real_open = os.open

    def denied(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(IngestError, match=r"private\.txt: permission denied; check the file's permissions$"):
        read_paths([path])


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file, so chmod 000 proves nothing")
def test_chmod_000_file_reports_permissions(tmp_path):
    path = tmp_path / "private.txt"
    path.write_text("secret")
    path.chmod(0)
    with pytest.raises(IngestError, match="permission denied"):
        read_paths([path])


def test_unreadable_file_inside_a_repository_is_skipped_not_fatal(monkeypatch, tmp_path):
    (tmp_path / "ok.py").write_text("x = 1\n")
    (tmp_path / "locked.py").write_text("y = 2\n")
    real_read_bytes = Path.read_bytes

    def read_bytes(self):
        if self.name == "locked.py":
            raise PermissionError(13, "Permission denied")
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    doc = read_paths([tmp_path])[0]
    assert [segment.path for segment in doc.segments] == ["ok.py"]
    assert {item.path: item.reason for item in doc.skipped}["locked.py"] == "could not be read (Permission denied)"


def test_the_broken_corpus_inside_a_repository_is_listed_not_fatal(tmp_path):
    for item in BROKEN.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    (tmp_path / "good.md").write_text("# Fine\n")
    doc = read_paths([tmp_path])[0]
    assert [segment.path for segment in doc.segments] == ["good.md"]
    skipped = {item.path: item.reason for item in doc.skipped}
    assert skipped["zero_bytes.txt"] == "empty"
    assert skipped["binary_named.txt"] == "binary (NUL or control bytes)"
    assert skipped["invalid_utf8.md"].startswith("is not valid UTF-8 text")
    assert skipped["password.pdf"] == "binary (.pdf)"
    assert skipped["not_a_zip.epub"] == "binary (.epub)"


def test_unexpected_failure_inside_a_reader_is_still_one_line(monkeypatch, tmp_path):
    import salachat.ingest.reader  # noqa: F401

    from salachat import ingest

    def explode(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(ingest.reader, "prose_document", explode)
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(IngestError, match=r"notes\.txt: could not be read \(ZeroDivisionError: boom\); if the"):
        read_paths([path])


def test_no_traceback_reaches_stderr_through_the_api():
    """A script that prints str(error) the way the CLI does shows one line and nothing else."""
    script = ("import sys\nfrom ingest import read_paths, IngestError\n"
              "try:\n    read_paths(sys.argv[1:])\nexcept IngestError as e:\n    print(e, file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", script, str(BROKEN / "truncated.pdf")],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
