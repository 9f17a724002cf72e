"""Crash-safe file writes: write a temporary file, fsync it, rename it over the target, fsync the folder.

A reader sees either the old file or the whole new one, whatever happens (kill -9, power cut, full disk).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

TMP_SUFFIX = ".tmp"


def write_chunk(f, data) -> None:
    """The one place bytes reach the disk; tests replace it to simulate a full disk or a slow write."""
    f.write(data)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, chunks: Iterable[bytes | memoryview]) -> tuple[str, int]:
    """Write the chunks to `path` atomically; return (sha256 hex, size in bytes) of what was written."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    digest, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                digest.update(chunk)
                write_chunk(f, chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return digest.hexdigest(), size


def sha256_file(path: Path, block: int = 16 << 20) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(block)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size
