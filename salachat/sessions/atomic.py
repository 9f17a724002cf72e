"""Crash-safe file writes: write a temporary file, fsync it, rename it over the target, fsync the folder.

A reader sees either the old file or the whole new one, whatever happens (kill -9, power cut, full disk).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import xxhash

TMP_SUFFIX = ".tmp"
# Sessions hold the whole text of what was read (decrypted PDFs included): private whatever the umask
FILE_MODE = 0o600
DIR_MODE = 0o700
PIECE = 64 << 20  # checksums hash the hashes of each 64 MiB piece: a verify hashes pieces in parallel
TREE_PREFIX = "tree64m:"  # sha256 pieces under a sha256 (sessions saved before XXH3_TREE_PREFIX)
XXH3_TREE_PREFIX = "xxh3tree64m:"  # XXH3-128 pieces under an XXH3-128


@dataclass(frozen=True)
class PieceTree:
    """One way of checksumming a file: a hash of each PIECE, and the same hash over their concatenated
    digests. The checksum is `prefix` + the hex of that top hash; a manifest lists the pieces' hex too."""

    prefix: str
    new: Callable  # a fresh hashlib-style object (update, digest, hexdigest)
    hex_digits: int

    def checksum(self, digests: list[bytes]) -> str:
        top = self.new()
        top.update(b"".join(digests))
        return self.prefix + top.hexdigest()


# Checksums catch a flipped bit, a torn or truncated write, a file swapped for another: not a forger, who
# could as well rewrite the digests in the manifest beside the file (schema.py bounds what a crafted manifest
# can do). A 128-bit non-cryptographic hash is enough for that, and XXH3-128 hashes ~30 GB/s a core against
# sha256's ~1.9 (python-xxhash releases the GIL, so threads scale): a lazy resume of a 1M-token session was
# bound by sha256 at 7.8 GB/s on 12 threads.
SHA256_TREE = PieceTree(TREE_PREFIX, hashlib.sha256, 64)
XXH3_TREE = PieceTree(XXH3_TREE_PREFIX, xxhash.xxh3_128, 32)
SAVED_TREE = XXH3_TREE  # what new saves write; every tree in TREES is still read
TREES = (XXH3_TREE, SHA256_TREE)


def tree_of(checksum: str) -> PieceTree | None:
    """The piece tree a manifest checksum was made with; None for a plain sha256 of the whole file (sessions
    saved before piece checksums). schema.py has already refused any other form."""
    return next((tree for tree in TREES if checksum.startswith(tree.prefix)), None)


class PieceHash:
    """A piece tree's checksum of consecutive PIECE-byte pieces, fed as a stream."""

    def __init__(self, tree: PieceTree | None = None):
        self.tree = tree or SAVED_TREE
        self.digests: list[bytes] = []
        self.piece, self.filled = self.tree.new(), 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), PIECE - self.filled)
            self.piece.update(view[:take])
            self.filled += take
            view = view[take:]
            if self.filled == PIECE:
                self.digests.append(self.piece.digest())
                self.piece, self.filled = self.tree.new(), 0

    def piece_digests(self) -> list[bytes]:
        return self.digests + ([self.piece.digest()] if self.filled or not self.digests else [])

    def hexdigest(self) -> str:
        return self.tree.checksum(self.piece_digests())


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
    if given, receives the digest of each PIECE (a lazy load verifies a piece on its own against them)."""
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


def piece_digests(path: Path, pieces: list[int], tree: PieceTree) -> list[bytes]:
    """Digests of the given PIECE-sized pieces of a file, read with preadv (threads share nothing) into one
    buffer: a new bytes object a read, as os.pread gives, held XXH3 to 15 GB/s on two cores against 24."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        view = memoryview(bytearray(min(16 << 20, PIECE, os.fstat(fd).st_size)))
        for index in pieces:
            digest, offset, end = tree.new(), index * PIECE, (index + 1) * PIECE
            while offset < end and (n := os.preadv(fd, [view[: min(len(view), end - offset)]], offset)):
                digest.update(view[:n])
                offset += n
            out.append(digest.digest())
    finally:
        os.close(fd)
    return out


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
