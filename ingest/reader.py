"""read_paths: the one entry point. Picks a reader by what the path is, reads it in bounded memory
(a chunk at a time, under hard caps and the caller's token limit), turns every failure into an
IngestError with one clear line, and serves unchanged PDFs and EPUBs from the cache."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from . import cache
from .document import Document
from .epub import read_epub
from .errors import Empty, IngestError, NotFound, PermissionDenied, TooLarge, Unexpected, Unsupported
from .html_text import HtmlText, declared_charset
from .pdf import read_pdf
from .prose import code_document, prose_document
from .repo import MAX_FILE_BYTES, read_repo
from .stream import MAX_INPUT_BYTES, Budget, Input, TextStream, estimate_tokens, human_bytes
from .textio import looks_binary

Progress = Callable[[str, int, int], None]
PROSE_KINDS = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown", ".rst": "rst",
               ".html": "html", ".htm": "html", ".xhtml": "html"}
CODE_SUFFIXES = {
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cxx", ".cu", ".cuh", ".rs", ".go", ".java",
    ".kt", ".kts", ".scala", ".js", ".mjs", ".cjs", ".ts", ".tsx", ".jsx", ".rb", ".php", ".swift", ".m",
    ".mm", ".cs", ".fs", ".hs", ".ml", ".lua", ".pl", ".r", ".jl", ".sh", ".bash", ".zsh", ".fish",
    ".ps1", ".sql", ".toml", ".yaml", ".yml", ".json", ".ini", ".cfg", ".xml", ".css", ".scss", ".vue",
    ".svelte", ".zig", ".nim", ".ex", ".exs", ".erl", ".clj", ".el", ".vim", ".tex", ".cmake", ".mk",
    ".proto", ".graphql", ".dockerfile", ".gradle", ".dart",
}
EARLY_HTML_BYTES = 4 << 20  # markup read before a page may be refused on an extrapolated estimate
SUPPORTED = (".pdf, .epub, .txt, .md, .rst, .html, source code files, any other plain text file, a folder, "
             "or any of these .gz-compressed")
__all__ = ["MAX_INPUT_BYTES", "PROSE_KINDS", "SUPPORTED", "detect_kind", "open_input", "read_path", "read_paths"]


def read_paths(paths: list[str | Path], password: str | None = None, progress: Progress | None = None,
               cache_dir: Path | None = None, max_file_bytes: int = MAX_FILE_BYTES, *,
               max_tokens: int | None = None) -> list[Document]:
    """Read every path into a Document; the first unreadable one raises IngestError. `max_tokens` is what
    the model can read (all documents together); a reading that passes it is refused as soon as it does."""
    budget = Budget(max_tokens)
    return [read_path(path, password, progress, cache_dir, max_file_bytes, budget=budget) for path in paths]


def read_path(path: str | Path, password: str | None = None, progress: Progress | None = None,
              cache_dir: Path | None = None, max_file_bytes: int = MAX_FILE_BYTES, *,
              max_tokens: int | None = None, budget: Budget | None = None) -> Document:
    budget = budget or Budget(max_tokens)
    try:
        doc = _read_path(path, password, progress, cache_dir, max_file_bytes, budget)
    except (IngestError, KeyboardInterrupt):
        raise
    except RecursionError:
        raise Unsupported(str(path), "is nested too deeply to read", hint="pass a simpler file or a subfolder") \
            from None
    except MemoryError:
        raise TooLarge(str(path), "needs more memory to read than this machine has",
                       hint="pass a smaller part of it") from None
    except Exception as error:
        raise Unexpected(str(path), f"could not be read ({type(error).__name__}: {error})",
                         hint="if the file opens elsewhere, please report this as a salachat bug") from error
    tokens = sum(estimate_tokens(segment.text) for segment in doc.segments)
    budget.check(str(path), tokens, 1, 1, doc.meta.get("bytes", 0))  # a cached or PDF text, counted whole
    budget.used += tokens
    return doc


def open_input(path: str | Path) -> Input | Path:
    """An Input for a readable regular file, the Path of a folder, or IngestError saying why neither."""
    source = str(path)
    location = Path(path).expanduser()
    try:
        info = location.stat()
    except FileNotFoundError:
        raise NotFound(source, "no such file or folder", hint="check the path") from None
    except PermissionError:
        raise PermissionDenied(source, "permission denied", hint="check the file's permissions") from None
    except OSError as error:  # a symbolic-link loop, a name too long ...
        raise NotFound(source, f"cannot be opened ({error.strerror})", hint="check the path") from None
    except ValueError:  # a NUL character in the name
        raise NotFound(source, "is not a valid path (it contains a NUL character)", hint="check the path") from None
    if stat.S_ISDIR(info.st_mode):
        if not os.access(location, os.R_OK | os.X_OK):
            raise PermissionDenied(source, "permission denied", hint="check the folder's permissions")
        return location
    if not stat.S_ISREG(info.st_mode):
        raise Unsupported(source, "is not a regular file or folder", hint="pass a document file or a folder")
    if info.st_size > MAX_INPUT_BYTES:
        raise TooLarge(source, f"is too large ({info.st_size:,} bytes; salachat reads files up to "
                       f"{human_bytes(MAX_INPUT_BYTES)})", hint="split it into smaller files",
                       size_bytes=info.st_size)
    if info.st_size == 0:
        raise Empty(source, "is empty (0 bytes)", hint="check that the file was saved or copied fully")
    return Input(location, source, info.st_size, compressed=location.name.lower().endswith(".gz"))


def _read_path(path: str | Path, password: str | None, progress: Progress | None, cache_dir: Path | None,
               max_file_bytes: int, budget: Budget) -> Document:
    opened = open_input(path)
    if isinstance(opened, Path):
        # Folders are not cached: measured on the torch tree (82 MB of text), loading a cached copy took
        # about as long as reading the files again from a warm page cache, and every edit would add a copy.
        return read_repo(opened, str(path), progress, max_file_bytes, budget=budget)
    inp = opened
    head = inp.head()
    if not head:
        raise Empty(inp.source, "is empty (it decompresses to 0 bytes)", hint="check the file")
    kind = detect_kind(inp.name, head, inp.source)
    if kind in ("pdf", "epub"):
        return _read_packaged(inp, kind, password, progress, cache_dir, budget)
    # Text is not cached either: decoding it costs about what loading its cached JSON would.
    return _read_text(inp, kind, progress, budget, head)


def _read_packaged(inp: Input, kind: str, password: str | None, progress: Progress | None,
                   cache_dir: Path | None, budget: Budget) -> Document:
    with inp.seekable() as (handle, content_hash):
        cached = cache.load(cache_dir, cache.file_key(content_hash, kind), inp.source)
        if cached is not None:
            if progress:
                progress(inp.source, 1, 1)
            return cached
        if kind == "pdf":
            doc = read_pdf(handle, inp.source, content_hash, password, progress, budget=budget,
                           size_bytes=inp.size)
        else:
            doc = read_epub(handle, inp.source, content_hash, budget=budget, size_bytes=inp.size,
                            progress=progress)
    if not (kind == "pdf" and doc.meta.get("encrypted") and password):
        cache.store(cache_dir, cache.file_key(content_hash, kind), doc)  # never a protected PDF's text
    return doc


def _read_text(inp: Input, kind: str, progress: Progress | None, budget: Budget, head: bytes) -> Document:
    """Text, Markdown, HTML and single code files, decoded and checked a chunk at a time; the extracted
    text is counted against the budget as it grows, so a file too long for the model is refused after
    the first megabytes, with an estimate of the whole."""
    html = HtmlText() if kind == "html" else None
    stream = TextStream(inp, declared=declared_charset(head) if html else None, progress=progress)
    total = inp.expected_size()
    pieces: list[str] = []
    tokens = 0
    for piece in stream:
        if html is not None:
            html.feed(piece)
            tokens = html.chars // 4  # the extracted text so far; refined below once it is whole
            # Markup parses at a few MB/s: once the start of a page shows that the whole is far too long
            # (twice the room left, by the text extracted so far), refuse rather than parse on for minutes.
            if total and inp.bytes_read >= EARLY_HTML_BYTES and total > inp.bytes_read:
                whole = tokens * total // inp.bytes_read
                if budget.used + whole > 2 * budget.limit:
                    raise budget.refusal(inp.source, whole, inp.size,
                                         compressed_to=total if inp.compressed else None)
        else:
            pieces.append(piece)
            tokens += estimate_tokens(piece)
        budget.check(inp.source, tokens, inp.bytes_read, total if total and total >= inp.bytes_read else None,
                     inp.size, compressed_to=total if inp.compressed else None)
    title = ""
    if html is not None:
        text, title, _ = html.close()
    else:
        text = "".join(pieces)
        pieces.clear()
    if progress:
        progress(inp.source, 1, 1)
    if kind == "code":
        doc = code_document(text, inp.source, stream.content_hash, stream.encoding)
    else:
        doc = prose_document(text, inp.source, kind, stream.content_hash, stream.encoding, title)
    doc.meta["bytes"] = inp.size
    return doc


def detect_kind(name: str, data: bytes, source: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix == ".pdf" or data[:5] == b"%PDF-":
        return "pdf"
    if suffix == ".epub":
        return "epub"
    if suffix in PROSE_KINDS:
        return PROSE_KINDS[suffix]
    if suffix in CODE_SUFFIXES or name in ("Makefile", "Dockerfile", "CMakeLists.txt"):
        return "code"
    if not looks_binary(data):
        return "text"  # README, LICENSE, Apache-2.0, server.log, data.csv: whatever reads as text is text
    shown = f"{suffix} files" if suffix else "binary files without an extension"
    raise Unsupported(source, f"{shown} are not supported", hint=f"supported: {SUPPORTED}")
