"""Parsed documents cached as JSON under cache_dir, keyed by the sha256 of the input bytes, so reading
an unchanged file again costs one hash. The reader version is part of the key: a changed reader never
serves stale text."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .document import Document

READER_VERSION = 1


def _entry(cache_dir: Path, content_hash: str, kind: str) -> Path:
    return cache_dir / "ingest" / f"{content_hash}-{kind}-v{READER_VERSION}.json"


def load(cache_dir: Path | None, content_hash: str, kind: str, source: str) -> Document | None:
    if cache_dir is None:
        return None
    try:
        data = json.loads(_entry(cache_dir, content_hash, kind).read_text(encoding="utf-8"))
        doc = Document.from_dict(data)
    except (OSError, ValueError, TypeError, KeyError):
        return None  # missing or damaged entry: read the file again
    doc.source = source  # the same bytes may live at another path now
    doc.meta["cached"] = True
    return doc


def store(cache_dir: Path | None, doc: Document) -> None:
    if cache_dir is None:
        return
    path = _entry(cache_dir, doc.content_hash, doc.kind)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a reader never sees half an entry.
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False,
                                         suffix=".tmp") as handle:
            json.dump(doc.to_dict(), handle, ensure_ascii=False)
        os.replace(handle.name, path)
    except OSError:
        pass  # a cache that cannot be written only costs speed next time
