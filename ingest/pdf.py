"""PDF pages to text with pypdf: one Segment per page, anchored "p.N" by physical page number."""

from __future__ import annotations

import io
import logging
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Self

from pypdf import PdfReader
from pypdf.errors import DependencyError, FileNotDecryptedError, PyPdfError

from .document import Document, Segment
from .errors import Damaged, Empty, IngestError, Protected
from .stream import Budget, estimate_tokens

Progress = Callable[[str, int, int], None]
# What pypdf raises on damaged files besides its own errors.
_BROKEN = (PyPdfError, KeyError, ValueError, TypeError, AttributeError, IndexError, OSError, EOFError, zlib.error,
           struct.error, RecursionError, OverflowError, AssertionError)


def read_pdf(data: bytes | BinaryIO, path: str, content_hash: str, password: str | None = None,
             progress: Progress | None = None, *, budget: Budget | None = None,
             size_bytes: int | None = None) -> Document:
    """`data` is the PDF's bytes or a seekable binary file (read lazily by pypdf, never whole)."""
    # pypdf logs every defect it recovers from; with no logging set up Python prints those to stderr,
    # which would break the one-line contract, so they are collected for the whole reading.
    with _PypdfComplaints():
        return _read_pdf(data, path, content_hash, password, progress, budget, size_bytes)


def _read_pdf(data: bytes | BinaryIO, path: str, content_hash: str, password: str | None,
              progress: Progress | None, budget: Budget | None, size_bytes: int | None) -> Document:
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    size = size_bytes if size_bytes is not None else _stream_size(stream)
    reader = _open(stream, path, password)
    try:
        page_count = len(reader.pages)
    except _BROKEN as error:
        raise _damaged(path, error) from None
    if page_count == 0:
        raise Empty(path, "has no pages", hint="check that the PDF opens in a viewer")
    segments: list[Segment] = []
    empty_pages: list[int] = []
    tokens = 0
    for number in range(1, page_count + 1):
        text = _page_text(reader, number, path)
        if not text.strip():
            empty_pages.append(number)
        segments.append(Segment(anchor=f"p.{number}", text=text, page=number))
        if budget is not None:
            tokens += estimate_tokens(text)
            budget.check(path, tokens, number, page_count, size)
        if progress:
            progress(path, number, page_count)
    if len(empty_pages) == page_count:
        raise Empty(path, f"has no text layer on any of its {page_count} pages (a scanned document?)",
                          hint="run OCR on it first (e.g. `ocrmypdf in.pdf out.pdf`) and pass the result")
    title, meta = _metadata(reader, path)
    meta.update(pages=page_count, encrypted=reader.is_encrypted, pages_without_text_list=empty_pages[:50],
                bytes=size)
    return Document(source=path, kind="pdf", title=title, segments=segments, content_hash=content_hash,
                    meta=meta, pages_without_text=len(empty_pages))


def _stream_size(stream: BinaryIO) -> int:
    stream.seek(0, io.SEEK_END)
    size = stream.tell()
    stream.seek(0)
    return size


def _open(stream: BinaryIO, path: str, password: str | None) -> PdfReader:
    head = stream.read(1024)
    stream.seek(0)
    if not head.lstrip()[:5].startswith(b"%PDF"):
        raise Damaged(path, "is not a PDF (it does not start with %PDF)",
                      hint="check the file, or rename it to its real type")
    try:
        with _PypdfComplaints():
            reader = PdfReader(stream, strict=False)
            if reader.is_encrypted:
                _decrypt(reader, path, password)
    except IngestError:
        raise
    except DependencyError:
        raise Protected(path, "is AES-encrypted and pypdf needs the 'cryptography' package to open it",
                          hint="run `pip install cryptography` and try again") from None
    except _BROKEN as error:
        raise _damaged(path, error) from None
    return reader


def _decrypt(reader: PdfReader, path: str, password: str | None) -> None:
    # Many PDFs are "encrypted" with an empty user password only to restrict printing or copying.
    for attempt in ([password] if password else []) + [""]:
        if reader.decrypt(attempt):
            return
    if password:
        raise Protected(path, "the password given does not open this PDF",
                          hint="check the password passed with --password")
    raise Protected(path, "is password-protected", hint="pass its password with --password")


def _page_text(reader: PdfReader, number: int, path: str) -> str:
    try:
        with _PypdfComplaints() as pypdf_said:
            text = reader.pages[number - 1].extract_text() or ""
    except FileNotDecryptedError:
        raise Protected(path, "is password-protected", hint="pass its password with --password") from None
    except DependencyError:
        raise Protected(path, "needs the 'cryptography' package to decrypt",
                          hint="run `pip install cryptography` and try again") from None
    except Exception as error:  # noqa: BLE001 - pypdf raises many kinds on damaged content streams
        raise Damaged(path, f"this page could not be read ({type(error).__name__}: {error})",
                          page=number, hint=_REPAIR_HINT) from None
    if not text.strip() and pypdf_said.complaints:
        raise Damaged(path, f"this page could not be read ({pypdf_said.complaints[0]})", page=number,
                          hint=_REPAIR_HINT)
    # NUL and other C0 controls come from broken font maps; they only confuse the model.
    return text.translate(_PLAIN_TEXT)


_REPAIR_HINT = ("the PDF may be damaged: repair it (e.g. `qpdf in.pdf out.pdf`) or print it to a new PDF, "
                "then try again")
_PLAIN_TEXT: dict[int, str | None] = {code: None for code in range(32) if code not in (9, 10, 12, 13)}
# Typeset ligatures: "ﬁles" must read (and be found) as "files".
_PLAIN_TEXT.update({ord("ﬀ"): "ff", ord("ﬁ"): "fi", ord("ﬂ"): "fl", ord("ﬃ"): "ffi", ord("ﬄ"): "ffl",
                    ord("ﬅ"): "st", ord("ﬆ"): "st"})


def _metadata(reader: PdfReader, path: str) -> tuple[str, dict]:
    meta: dict = {}
    try:
        info = reader.metadata or {}
        for key in ("title", "author", "subject"):
            value = getattr(info, key, None)
            if value and str(value).strip():
                meta[key] = " ".join(str(value).split())
    except Exception:  # noqa: BLE001 - metadata is a nicety; a damaged Info dict must not lose the text
        meta["metadata_unreadable"] = True

    name = path[:-3] if path.lower().endswith(".gz") else path
    return meta.get("title") or Path(name).stem, meta


def _damaged(path: str, error: Exception) -> IngestError:
    return Damaged(path, f"is damaged or not a valid PDF ({type(error).__name__}: {error})",
                       hint="repair it (e.g. `qpdf in.pdf out.pdf`) or export it again, then try again")


class _PypdfComplaints:
    """pypdf logs and warns about every recoverable defect instead of raising; collect those complaints
    so that a page that comes out empty *because* it is damaged is reported, not counted as textless."""

    def __init__(self) -> None:
        self.complaints: list[str] = []

    def __enter__(self) -> Self:
        self._logger = logging.getLogger("pypdf")
        self._saved = (self._logger.level, self._logger.propagate)
        self._handler = _Collect(self.complaints)
        self._logger.addHandler(self._handler)
        self._logger.setLevel(logging.WARNING)
        self._logger.propagate = False
        self._warnings = warnings.catch_warnings(record=True)
        self._caught = self._warnings.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.complaints.extend(str(warning.message) for warning in self._caught or [])
        self._warnings.__exit__(*exc_info)
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._saved[0])
        self._logger.propagate = self._saved[1]


class _Collect(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())
