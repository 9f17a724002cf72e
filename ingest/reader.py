"""read_paths: the one entry point. Picks a reader by what the path is, turns every failure into an
IngestError with one clear line, and serves unchanged files from the cache."""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

from . import cache
from .document import Document
from .epub import read_epub
from .errors import IngestError
from .pdf import read_pdf
from .prose import read_code_file, read_prose
from .repo import MAX_FILE_BYTES, read_repo
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
SUPPORTED = ".pdf, .epub, .txt, .md, .rst, .html, source code files, a folder, or any of these .gz-compressed"
MAX_INPUT_BYTES = 2 * 1024**3  # refuse rather than exhaust memory on a mistaken path


def read_paths(paths: list[str | Path], password: str | None = None, progress: Progress | None = None,
               cache_dir: Path | None = None, max_file_bytes: int = MAX_FILE_BYTES) -> list[Document]:
    """Read every path into a Document; the first unreadable one raises IngestError."""
    return [read_path(path, password, progress, cache_dir, max_file_bytes) for path in paths]


def read_path(path: str | Path, password: str | None = None, progress: Progress | None = None,
              cache_dir: Path | None = None, max_file_bytes: int = MAX_FILE_BYTES) -> Document:
    try:
        return _read_path(path, password, progress, cache_dir, max_file_bytes)
    except (IngestError, KeyboardInterrupt):
        raise
    except RecursionError:
        raise IngestError(str(path), "is nested too deeply to read", hint="pass a simpler file") from None
    except Exception as error:
        raise IngestError(str(path), f"could not be read ({type(error).__name__}: {error})",
                          hint="if the file opens elsewhere, please report this as a salachat bug") from error


def _read_path(path: str | Path, password: str | None, progress: Progress | None, cache_dir: Path | None,
               max_file_bytes: int) -> Document:
    source = str(path)
    location = Path(path).expanduser()
    try:
        info = location.stat()
    except FileNotFoundError:
        raise IngestError(source, "no such file or folder", hint="check the path") from None
    except PermissionError:
        raise IngestError(source, "permission denied", hint="check the file's permissions") from None
    except OSError as error:
        raise IngestError(source, f"cannot be opened ({error.strerror})", hint="check the path") from None
    if stat.S_ISDIR(info.st_mode):
        return _read_folder(location, source, progress, max_file_bytes)
    if not stat.S_ISREG(info.st_mode):
        raise IngestError(source, "is not a regular file or folder", hint="pass a document file or a folder")
    if info.st_size > MAX_INPUT_BYTES:
        raise IngestError(source, f"is too large ({info.st_size:,} bytes)", hint="split it into smaller files")
    data = _read_bytes(location, source)
    name = location.name
    if name.lower().endswith(".gz"):
        data, name = _gunzip(data, source), name[:-3]
    if not data:
        raise IngestError(source, "is empty (0 bytes)", hint="check that the file was saved or copied fully")
    kind = detect_kind(name, data, source)
    content_hash = hashlib.sha256(data).hexdigest()
    cached = cache.load(cache_dir, cache.file_key(content_hash, kind), source)
    if cached is not None:
        if progress:
            progress(source, 1, 1)
        return cached
    doc = _parse(kind, data, source, content_hash, password, progress)
    if not (kind == "pdf" and doc.meta.get("encrypted") and password):
        cache.store(cache_dir, cache.file_key(content_hash, kind), doc)  # never a protected PDF's text
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
    if suffix == "" and not looks_binary(data):
        return "text"  # README, LICENSE, NOTES: extensionless files are usually text
    shown = suffix or "files without an extension"
    raise IngestError(source, f"{shown} files are not supported", hint=f"supported: {SUPPORTED}")


def _parse(kind: str, data: bytes, source: str, content_hash: str, password: str | None,
           progress: Progress | None) -> Document:
    if kind == "pdf":
        return read_pdf(data, source, content_hash, password, progress)
    if kind == "epub":
        doc = read_epub(data, source, content_hash)
    elif kind == "code":
        doc = read_code_file(data, source, content_hash)
    else:
        doc = read_prose(data, source, kind, content_hash)
    if progress:
        progress(source, 1, 1)
    return doc


def _read_folder(location: Path, source: str, progress: Progress | None, max_file_bytes: int) -> Document:
    if not os.access(location, os.R_OK | os.X_OK):
        raise IngestError(source, "permission denied", hint="check the folder's permissions")
    # Folders are not cached: measured on the torch tree (82 MB of text), loading a cached copy took
    # about as long as reading the files again from a warm page cache, and every edit would add a copy.
    return read_repo(location, source, progress, max_file_bytes)


def _read_bytes(location: Path, source: str) -> bytes:
    try:
        return location.read_bytes()
    except PermissionError:
        raise IngestError(source, "permission denied", hint="check the file's permissions") from None
    except IsADirectoryError:
        raise IngestError(source, "is a folder", hint="pass the folder itself") from None
    except OSError as error:
        raise IngestError(source, f"cannot be read ({error.strerror})", hint="check the file") from None


def _gunzip(data: bytes, source: str) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise IngestError(source, f"is not a valid gzip file ({error})", hint="decompress it yourself, "
                          "or pass the uncompressed file") from None
