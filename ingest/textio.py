"""Bytes to text without mojibake: BOMs first, then strict UTF-8, then detection for legacy encodings."""

from __future__ import annotations

import codecs
import unicodedata

import charset_normalizer

from .errors import BadEncoding, Binary, IngestError

_BOMS = (  # longest first: the UTF-32-LE BOM starts with the UTF-16-LE one
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
BOMS = _BOMS
_SNIFF_BYTES = 8192
# Control bytes that never occur in text files (tab, newlines, form feed and escape do).
_BINARY_CONTROL = set(range(8)) | {11, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 28, 29, 30, 31}


def looks_binary(data: bytes) -> bool:
    """True for bytes that are not text in any encoding we read: NUL bytes or many control bytes."""
    head = data[:_SNIFF_BYTES]
    if any(head.startswith(bom) for bom, _ in _BOMS):
        return False
    if b"\x00" in head:
        return True
    control = sum(1 for byte in head if byte in _BINARY_CONTROL)
    return control > max(4, len(head) // 100)


def decode_text(data: bytes, path: str) -> tuple[str, str]:
    """Return (text, encoding name) or raise IngestError with a one-line reason."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom):].decode(encoding), encoding
            except UnicodeDecodeError as error:
                raise _invalid(path, data, error.start + len(bom), encoding) from None
    if looks_binary(data):
        raise Binary(path, "looks like a binary file, not text (it contains NUL or control bytes)",
                          hint="pass the original document (PDF, EPUB, text) instead")
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as error:
        first_bad = error.start
    # Mostly valid multi-byte UTF-8 means the file *is* UTF-8 and is damaged: guessing a legacy
    # encoding would turn every accented letter into mojibake, so say so instead.
    if _mostly_utf8(data):
        raise _invalid(path, data, first_bad, "utf-8")
    return _decode_legacy(data, path, first_bad)


def _decode_legacy(data: bytes, path: str, first_bad: int) -> tuple[str, str]:
    """Legacy 8-bit or CJK text. Detection alone guesses wrong on short Western text (it calls a French
    sentence Big5), so trust it only when it is sure of a language, and otherwise prefer Windows-1252
    when that reads as plausible Latin text."""
    best = charset_normalizer.from_bytes(data).best()
    western = _plausible_cp1252(data)
    if best is not None and best.language != "Unknown" and best.chaos < 0.1 and not (
            western is not None and _mostly_latin(str(best))):
        return str(best), best.encoding  # a confident non-Latin script: Cyrillic, Greek, CJK ...
    if western is not None:
        return western, "cp1252"
    if best is not None and best.chaos <= 0.2:
        return str(best), best.encoding
    raise _invalid(path, data, first_bad, "utf-8")


def _mostly_latin(text: str) -> bool:
    letters = [char for char in text if char.isalpha() and ord(char) >= 0x80]
    latin = sum(1 for char in letters if unicodedata.name(char, "").startswith("LATIN"))
    return latin * 2 >= len(letters)


def _plausible_cp1252(data: bytes) -> str | None:
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError:
        return None
    letters = [char for char in text if char.isalpha()]
    accented = sum(1 for char in letters if ord(char) >= 0x80)
    # Real Latin-script text is mostly ASCII letters; Cyrillic or Greek bytes read as cp1252 are not.
    return text if letters and accented / len(letters) < 0.4 else None


def _mostly_utf8(data: bytes) -> bool:
    """More valid multi-byte UTF-8 characters than invalid bytes: damaged UTF-8, not a legacy encoding
    (legacy CJK bytes form the odd valid UTF-8 sequence by accident, never a majority)."""
    decoded = data.decode("utf-8", errors="replace")
    invalid = decoded.count("\ufffd")
    valid = sum(1 for char in decoded if ord(char) >= 0x80) - invalid
    return valid > invalid


def _invalid(path: str, data: bytes, offset: int, encoding: str) -> IngestError:
    line = data.count(b"\n", 0, offset) + 1
    return BadEncoding(
        path,
        f"is not valid {encoding.upper()} text (bad byte 0x{data[offset]:02x} at line {line}, byte {offset})",
        hint="the file is damaged or mixes encodings: fix or remove that byte, or re-save the file as UTF-8",
    )
