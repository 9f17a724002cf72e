"""Parsed documents cached as JSON under cache_dir, keyed by the sha256 of the input bytes, so reading
an unchanged file again costs one hash instead of a parse. The reader version is part of the key: a
changed reader never serves stale text. Least recently used entries go once the cache passes its cap."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .document import Document

READER_VERSION = 2  # 2: EPUB chapters decoded in their declared encodings
MAX_CACHE_BYTES = 1024**3


def file_key(content_hash: str, kind: str) -> str:
    return f"{content_hash}-{kind}"


def _folder(cache_dir: Path) -> Path:
    return cache_dir / "ingest"


def _entry(cache_dir: Path, key: str) -> Path:
    return _folder(cache_dir) / f"{key}-v{READER_VERSION}.json"


def load(cache_dir: Path | None, key: str, source: str) -> Document | None:
    if cache_dir is None:
        return None
    path = _entry(cache_dir, key)
    try:
        doc = Document.from_dict(json.loads(path.read_text(encoding="utf-8")))
        os.utime(path)  # recently used: evicted last
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # missing or damaged entry: read the input again
    doc.source = source  # the same bytes may live at another path now
    doc.meta["cached"] = True
    return doc


def store(cache_dir: Path | None, key: str, doc: Document, max_bytes: int = MAX_CACHE_BYTES) -> None:
    if cache_dir is None:
        return
    path = _entry(cache_dir, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)  # entries hold documents' text: private (temporary files are 0600)
        # Write then rename, so a reader never sees half an entry.
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False,
                                         suffix=".tmp") as handle:
            json.dump(doc.to_dict(), handle, ensure_ascii=False)
        os.replace(handle.name, path)
        _evict(_folder(cache_dir), max_bytes)
    except OSError:
        pass  # a cache that cannot be written only costs speed next time


def _evict(folder: Path, max_bytes: int) -> None:
    entries = [(entry.stat().st_mtime, entry.stat().st_size, entry) for entry in folder.glob("*.json")]
    total = sum(size for _, size, _ in entries)
    for _, size, entry in sorted(entries, key=lambda item: item[0]):
        if total <= max_bytes:
            break
        entry.unlink(missing_ok=True)
        total -= size
