"""Crash-safe file writes: write a temporary file, fsync it, rename it over the target, fsync the folder.

A reader sees either the old file or the whole new one, whatever happens (kill -9, power cut, full disk).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

TMP_SUFFIX = ".tmp"
# Sessions hold the whole text of what was read (decrypted PDFs included): private whatever the umask
FILE_MODE = 0o600
DIR_MODE = 0o700
PIECE = 64 << 20  # checksums are a sha256 over the sha256 of each 64 MiB piece: verifying hashes pieces in parallel
TREE_PREFIX = "tree64m:"


class PieceHash:
    """sha256 of the concatenated sha256 digests of consecutive PIECE-byte pieces, fed as a stream."""

    def __init__(self):
        self.digests: list[bytes] = []
        self.piece, self.filled = hashlib.sha256(), 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), PIECE - self.filled)
            self.piece.update(view[:take])
            self.filled += take
            view = view[take:]
            if self.filled == PIECE:
                self.digests.append(self.piece.digest())
                self.piece, self.filled = hashlib.sha256(), 0

    def piece_digests(self) -> list[bytes]:
        return self.digests + ([self.piece.digest()] if self.filled or not self.digests else [])

    def hexdigest(self) -> str:
        return tree_checksum(self.piece_digests())


def write_chunk(f, data) -> None:
    """The one place bytes reach the disk; tests replace it to simulate a full disk or a slow write."""
    f.write(data)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _private_opener(path, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)


def write_atomic(path: Path, chunks: Iterable[bytes | memoryview],
                 pieces: list[bytes] | None = None) -> tuple[str, int]:
    """Write the chunks to `path` atomically; return (checksum, size in bytes) of what was written. `pieces`,
    if given, receives the sha256 of each PIECE (a lazy load verifies a piece on its own against them)."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    digest, size = PieceHash(), 0
    try:
        with open(tmp, "wb", opener=_private_opener) as f:
            os.fchmod(f.fileno(), FILE_MODE)  # a leftover .tmp of another mode keeps its mode through O_CREAT
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
    if pieces is not None:
        pieces[:] = digest.piece_digests()
    return digest.hexdigest(), size


def private_dir(folder: Path) -> None:
    """Create `folder` (and missing parents) if needed and make it 0700."""
    folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if folder.stat().st_mode & 0o777 != DIR_MODE:
        os.chmod(folder, DIR_MODE)


def piece_digests(path: Path, pieces: list[int]) -> list[bytes]:
    """sha256 of the given PIECE-sized pieces of a file (read with pread: threads can share nothing)."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for index in pieces:
            digest, offset, end = hashlib.sha256(), index * PIECE, (index + 1) * PIECE
            while offset < end and (data := os.pread(fd, min(16 << 20, end - offset), offset)):
                digest.update(data)
                offset += len(data)
            out.append(digest.digest())
    finally:
        os.close(fd)
    return out


def tree_checksum(digests: list[bytes]) -> str:
    return TREE_PREFIX + hashlib.sha256(b"".join(digests)).hexdigest()


def sha256_file(path: Path, block: int = 16 << 20) -> tuple[str, int]:
    """Plain sha256 of a whole file (sessions written before piece checksums)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(block)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size
