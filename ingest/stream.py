"""Input bytes in bounded memory: files and .gz streams read a chunk at a time under hard caps, decoded
incrementally in the encoding chosen from the first megabyte, checked for binary content in every
chunk, and counted against a token budget that refuses as soon as it is passed (with the size, an
estimate of the whole and the limit), long before a huge file has been read."""

from __future__ import annotations

import codecs
import contextlib
import gzip
import hashlib
import os
import re
import stat
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .errors import (
    BadEncoding,
    Binary,
    Damaged,
    IngestError,
    NotFound,
    PermissionDenied,
    TooLarge,
    Unsupported,
)
from .textio import BOMS, decode_text, looks_binary

Progress = Callable[[str, int, int], None]
CHUNK_BYTES = 1 << 20
SAMPLE_BYTES = 1 << 20  # what encoding detection looks at; the rest is decoded in the encoding found there
MAX_INPUT_BYTES = 1 << 30  # on disk, or after decompression: a larger input is refused before it is read
# Tokens read when the caller does not say what its model can take, and the ceiling whatever it says:
# 16M tokens is ~64M characters, which with the copies segmenting and rendering make stays far below 2 GB.
DEFAULT_MAX_TOKENS = 4_000_000
HARD_MAX_TOKENS = 16_000_000
_WIDE = re.compile("[\u2e80-\U0010ffff]")
# Control characters that never occur in text (tab, newlines, form feed, backspace and escape do).
_CONTROL = re.compile("[\x00-\x07\x0b\x0e-\x1a\x1c-\x1f]")


def estimate_tokens(text: str) -> int:
    """About 4 characters a token for Latin script and code, one token per CJK character."""
    wide = 0 if text.isascii() else len(_WIDE.findall(text))
    return (len(text) - wide + 3) // 4 + wide


def has_binary(text: str) -> bool:
    """A NUL, or more control characters than text ever has (1 %), anywhere in `text`."""
    if "\x00" in text:
        return True
    controls = len(_CONTROL.findall(text))
    return controls > max(4, len(text) // 100)


def human_bytes(size: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


@dataclass
class Budget:
    """Estimated tokens across every document of one reading, against what the model can read."""

    limit: int | None = None
    used: int = 0  # tokens of the documents already read

    def __post_init__(self) -> None:
        self.limit = min(self.limit or DEFAULT_MAX_TOKENS, HARD_MAX_TOKENS)

    def check(self, source: str, tokens: int, done: int, total: int | None, size_bytes: int,
              compressed_to: int | None = None) -> None:
        """Refuse once `tokens` of this document (after `done` of `total` units) cannot fit. The estimate
        of the whole is extrapolated from the part read, so the refusal comes early with a real figure."""
        if self.used + tokens <= self.limit:
            return
        if total and done and total > done:
            whole, about = tokens * total // done, "about"
        else:
            whole, about = tokens, "at least" if total is None or done < (total or 0) else "about"
        raise self.refusal(source, whole, size_bytes, about, compressed_to)

    def refusal(self, source: str, tokens: int, size_bytes: int, about: str = "about",
                compressed_to: int | None = None) -> TooLarge:
        others = f" (with {self.used:,} tokens of the documents before it)" if self.used else ""
        ceiling = " (salachat's ceiling)" if self.limit == HARD_MAX_TOKENS else ""
        return TooLarge(
            source, f"is too long to read: {human_bytes(size_bytes)}"
            + (f" ({human_bytes(compressed_to)} decompressed)" if compressed_to else "")
            + f", {about} {tokens:,} tokens{others}, "
            f"more than the {self.limit:,} tokens the model can read{ceiling}",
            hint="pass a part of it (split the file, or pass a subfolder) or use a model with a longer context",
            size_bytes=size_bytes, tokens=tokens, limit=self.limit)


@dataclass
class Input:
    """One input file; `.gz` files are decompressed as they are read."""

    location: Path
    source: str
    size: int  # on disk
    compressed: bool = False
    bytes_read: int = field(default=0, init=False)  # after decompression, by the last chunks() pass

    @property
    def name(self) -> str:
        name = self.location.name
        return name[:-3] if self.compressed else name

    def expected_size(self) -> int | None:
        """Bytes after decompression: the gzip trailer's ISIZE (modulo 4 GiB, so only a hint), else the
        size on disk."""
        if not self.compressed:
            return self.size
        try:
            with open_regular(self.location, self.source) as raw:
                raw.seek(-4, os.SEEK_END)
                (isize,) = struct.unpack("<I", raw.read(4))
        except (OSError, struct.error):
            return None
        return isize or None

    @contextlib.contextmanager
    def open(self) -> Iterator[BinaryIO]:
        with open_regular(self.location, self.source) as raw:
            if self.compressed:
                with gzip.GzipFile(fileobj=raw) as unpacked:
                    yield unpacked  # type: ignore[misc]
            else:
                yield raw

    def chunks(self, size: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The decompressed bytes, a chunk at a time, refused past MAX_INPUT_BYTES."""
        self.bytes_read = 0
        with self.open() as handle:
            while True:
                try:
                    chunk = handle.read(size)
                except (OSError, EOFError, zlib.error) as error:
                    raise self._read_error(error) from None
                if not chunk:
                    return
                self.bytes_read += len(chunk)
                if self.bytes_read > MAX_INPUT_BYTES:
                    raise TooLarge(self.source, f"decompresses to more than {human_bytes(MAX_INPUT_BYTES)}",
                                   hint="decompress it yourself and pass a part of it",
                                   size_bytes=self.bytes_read)
                yield chunk

    def head(self, size: int = 65536) -> bytes:
        with self.open() as handle:
            try:
                return handle.read(size)
            except (OSError, EOFError, zlib.error) as error:
                raise self._read_error(error) from None

    @contextlib.contextmanager
    def seekable(self) -> Iterator[tuple[BinaryIO, str]]:
        """A seekable binary file of the (decompressed) content and its sha256, hashed in one pass:
        the file itself, or a temporary file on disk for a .gz (never the whole content in memory)."""
        digest = hashlib.sha256()
        if not self.compressed:
            with open_regular(self.location, self.source) as raw:
                for chunk in iter(lambda: raw.read(CHUNK_BYTES), b""):
                    digest.update(chunk)
                raw.seek(0)
                yield raw, digest.hexdigest()
            return
        with tempfile.TemporaryFile() as copy:
            os.fchmod(copy.fileno(), 0o600)
            for chunk in self.chunks():
                digest.update(chunk)
                copy.write(chunk)
            copy.seek(0)
            yield copy, digest.hexdigest()  # type: ignore[misc]

    def _read_error(self, error: Exception) -> IngestError:
        if self.compressed:
            return Damaged(self.source, f"is not a valid gzip file ({error})",
                           hint="decompress it yourself, or pass the uncompressed file")
        return NotFound(self.source, f"cannot be read ({getattr(error, 'strerror', None) or error})",
                        hint="check the file")


@contextlib.contextmanager
def open_regular(location: Path, source: str) -> Iterator[BinaryIO]:
    """Open for reading without ever blocking: a FIFO or device swapped in after stat() is refused, not
    waited on."""
    try:
        descriptor = os.open(location, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise NotFound(source, "no such file or folder", hint="check the path") from None
    except PermissionError:
        raise PermissionDenied(source, "permission denied", hint="check the file's permissions") from None
    except IsADirectoryError:
        raise Unsupported(source, "is a folder", hint="pass the folder itself") from None
    except OSError as error:
        raise NotFound(source, f"cannot be opened ({error.strerror})", hint="check the path") from None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise Unsupported(source, "is not a regular file or folder", hint="pass a document file or a folder")
        os.set_blocking(descriptor, True)
        handle = os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise
    with handle:
        yield handle


def _latin1_fallback(error: UnicodeDecodeError) -> tuple[str, int]:
    return error.object[error.start:error.end].decode("latin-1"), error.end


# Declared ISO-8859-1 is read as Windows-1252 (as browsers do: such files hold its curly quotes), and the
# five bytes Windows-1252 leaves undefined as their Latin-1 control characters instead of failing.
codecs.register_error("salachat-latin1", _latin1_fallback)
_LATIN1 = {"latin-1", "latin1", "iso-8859-1", "iso8859-1", "iso_8859_1", "l1", "ascii", "us-ascii", "cp1252",
           "windows-1252"}


def codec_name(declared: str | None) -> str | None:
    """A Python codec for a declared charset name, or None when the name is unknown."""
    if not declared:
        return None
    name = declared.strip().strip("\"'").lower()
    if name in _LATIN1:
        return "cp1252"
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def choose_encoding(sample: bytes, complete: bool, source: str, declared: str | None = None) -> tuple[str, int]:
    """(codec, bytes of BOM to skip) for a file whose first bytes are `sample`; `complete` when the sample
    is the whole file. A BOM wins, then a declared encoding that decodes the sample, then detection."""
    for bom, encoding in BOMS:
        if sample.startswith(bom):
            return encoding, len(bom)
    codec = codec_name(declared)
    if codec:
        try:
            _decoder(codec).decode(sample, final=complete)  # incremental: a cut character at the end is fine
            return codec, 0
        except UnicodeError:  # not only UnicodeDecodeError: "UTF-16 stream does not start with BOM"
            pass  # the declaration is wrong: detect instead of decoding garbage
    _, encoding = decode_text(sample if complete else _cut_at_line(sample), source)
    return encoding, 0


def _cut_at_line(sample: bytes) -> bytes:
    """The sample up to its last newline, so detection never sees half a multi-byte character."""
    cut = sample.rfind(b"\n")
    return sample[:cut + 1] if cut > 0 else sample[:max(len(sample) - 4, 0)]


@dataclass
class TextStream:
    """Decoded text of an Input, piece by piece, with the content hash, the encoding and binary checks."""

    input: Input
    declared: str | None = None  # an encoding the document declares (meta charset, XML declaration)
    progress: Progress | None = None
    encoding: str = ""
    content_hash: str = ""
    chars: int = 0

    def __iter__(self) -> Iterator[str]:
        digest = hashlib.sha256()
        self._decoder: codecs.IncrementalDecoder | None = None
        self._ascii = True  # every byte so far was ASCII: the encoding is still open
        skip = 0
        line = 1
        total = self.input.expected_size()
        buffered = b""
        for chunk in self.input.chunks():
            digest.update(chunk)
            if self._decoder is None:  # gather the sample encoding detection needs
                buffered += chunk
                if len(buffered) < SAMPLE_BYTES:
                    continue
                chunk, buffered = buffered, b""
                self._choose(chunk, False)
                skip = self._skip
            for piece in self._decode(chunk[skip:], line, self.input.bytes_read - len(chunk) + skip):
                line += piece.count("\n")
                yield piece
            skip = 0
            if self.progress and total:
                self.progress(self.input.source, min(self.input.bytes_read, total), total)
        if self._decoder is None:  # a file smaller than the sample: detection sees all of it
            if not buffered:
                self.content_hash = digest.hexdigest()
                return
            self._choose(buffered, True)
            yield from self._decode(buffered[self._skip:], line, self._skip)
        try:
            tail = self._decoder.decode(b"", final=True)
        except UnicodeError:
            raise BadEncoding(self.input.source, f"is not valid {self.encoding.upper()} text (it ends in the "
                              "middle of a character)", hint="the file is truncated: copy it again") from None
        if tail:
            self._check_binary(tail, line)
            self.chars += len(tail)
            yield tail
        self.content_hash = digest.hexdigest()

    def _choose(self, sample: bytes, complete: bool) -> None:
        self.encoding, self._skip = choose_encoding(sample, complete, self.input.source, self.declared)
        self._decoder = _decoder(self.encoding)

    def _decode(self, chunk: bytes, line: int, offset: int) -> Iterator[str]:
        decoder = self._decoder
        pending = decoder.getstate()[0]
        try:
            text = decoder.decode(chunk)
        except UnicodeError as failure:
            data = pending + chunk
            error = failure if isinstance(failure, UnicodeDecodeError) else UnicodeDecodeError(
                self.encoding, data, 0, 1, str(failure))
            if looks_binary(data):
                raise Binary(self.input.source, f"contains binary data (NUL or control bytes) near byte "
                             f"{offset:,}", hint="pass the original document (PDF, EPUB, text) instead") from None
            text = self._redetect(data, error)
            if text is None:
                bad_line = line + data.count(b"\n", 0, error.start)
                raise BadEncoding(
                    self.input.source, f"is not valid {self.encoding.upper()} text (bad byte "
                    f"0x{data[error.start]:02x} at line {bad_line}, byte {offset - len(pending) + error.start})",
                    hint="the file is damaged or mixes encodings: fix or remove that byte, or re-save the file "
                    "as UTF-8") from None
        self._ascii = self._ascii and chunk.isascii()
        self._check_binary(text, line)
        self.chars += len(text)
        yield text

    def _redetect(self, data: bytes, error: UnicodeDecodeError) -> str | None:
        """A long file whose first megabyte is plain ASCII was read as UTF-8; if its first non-ASCII bytes
        are in a legacy encoding instead, that encoding reads the rest (ASCII reads the same in both)."""
        if not self._ascii or self.declared or self.encoding != "utf-8" or not data[:error.start].isascii():
            return None
        window = data[error.start:error.start + SAMPLE_BYTES]
        try:
            _, encoding = decode_text(_cut_at_line(window) or window, self.input.source)
        except IngestError:
            return None
        if encoding == "utf-8" or "a".encode(encoding) != b"a":  # only an ASCII-compatible one
            return None
        self.encoding, self._decoder = encoding, _decoder(encoding)
        try:
            return self._decoder.decode(data)
        except UnicodeError:
            return None

    def _check_binary(self, text: str, line: int) -> None:
        if has_binary(text):
            first = _CONTROL.search(text)
            where = line + text.count("\n", 0, first.start() if first else 0)
            raise Binary(self.input.source, f"contains binary data (NUL or control bytes) from line {where:,}",
                         hint="pass the original document (PDF, EPUB, text) instead, or cut the binary part")


def _decoder(encoding: str) -> codecs.IncrementalDecoder:
    errors = "salachat-latin1" if encoding == "cp1252" else "strict"
    return codecs.getincrementaldecoder(encoding)(errors=errors)
