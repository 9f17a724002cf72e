"""Parsed documents cached as JSON under cache_dir, so reading an unchanged input again is free.

A file's key is the sha256 of its bytes (one hash instead of a parse). A repository's key is a
fingerprint of its walk: every file's path, size and modification time plus what was skipped and why,
the way git decides a file is unchanged without reading it; editing, adding, removing or newly ignoring
a file changes it. The reader version is part of every key: a changed reader never serves stale text."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from .document import Document, Skipped

READER_VERSION = 1


def file_key(content_hash: str, kind: str) -> str:
    return f"{content_hash}-{kind}"


def repo_key(root: Path, files: list[tuple[str, os.stat_result]], skipped: list[Skipped],
             max_file_bytes: int) -> str:
    digest = hashlib.sha256(f"{os.path.realpath(root)}\0{max_file_bytes}\n".encode())
    for relative, info in files:
        digest.update(f"{relative}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    for item in skipped:
        digest.update(f"skip\0{item.path}\0{item.reason}\n".encode())
    return f"repo-{digest.hexdigest()}"


def _entry(cache_dir: Path, key: str) -> Path:
    return cache_dir / "ingest" / f"{key}-v{READER_VERSION}.json"


def load(cache_dir: Path | None, key: str, source: str) -> Document | None:
    if cache_dir is None:
        return None
    try:
        data = json.loads(_entry(cache_dir, key).read_text(encoding="utf-8"))
        doc = Document.from_dict(data)
    except (OSError, ValueError, TypeError, KeyError):
        return None  # missing or damaged entry: read the input again
    doc.source = source  # the same bytes may live at another path now
    doc.meta["cached"] = True
    return doc


def store(cache_dir: Path | None, key: str, doc: Document) -> None:
    if cache_dir is None:
        return
    path = _entry(cache_dir, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a reader never sees half an entry.
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False,
                                         suffix=".tmp") as handle:
            json.dump(doc.to_dict(), handle, ensure_ascii=False)
        os.replace(handle.name, path)
    except OSError:
        pass  # a cache that cannot be written only costs speed next time
