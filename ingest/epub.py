"""EPUB with the standard library: container.xml names the OPF package, whose spine orders the XHTML
chapters. Each non-empty spine item becomes one Segment anchored "ch.N". Chapters are decompressed
under a cap that counts the bytes actually inflated (a zip's declared sizes can lie), decoded in the
encoding they declare, and counted against the token budget as the book is read."""

from __future__ import annotations

import io
import posixpath
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote
from xml.etree import ElementTree

from .document import Document, Segment
from .errors import BadEncoding, Damaged, Empty, IngestError, Protected, TooLarge
from .html_text import HtmlText, declared_charset
from .stream import Budget, _decoder, choose_encoding, estimate_tokens, human_bytes

_CONTAINER = "META-INF/container.xml"
MAX_CHAPTER_BYTES = 32 * 1024 * 1024  # a zip-bomb guard: a real chapter is a few hundred KB
MAX_BOOK_BYTES = 256 * 1024 * 1024  # all chapters together, after decompression
_MAX_XML_BYTES = 8 * 1024 * 1024  # container.xml, the package, encryption.xml
_HINT = "the EPUB may be damaged: open it in an e-book reader and export it again"
_ZIP_BROKEN = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error, ValueError,
               NotImplementedError)


def read_epub(data: bytes | BinaryIO, path: str, content_hash: str, *, budget: Budget | None = None,
              size_bytes: int | None = None, progress: Callable[[str, int, int], None] | None = None) -> Document:
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        book = zipfile.ZipFile(stream)
    except zipfile.BadZipFile:
        raise Damaged(path, "is not a valid EPUB (it is not a zip archive)", hint=_HINT) from None
    except _ZIP_BROKEN as error:
        raise Damaged(path, f"is not a valid EPUB ({error})", hint=_HINT) from None
    with book:
        names = set(book.namelist())
        if "META-INF/encryption.xml" in names and _has_encrypted_content(book, path):
            raise Protected(path, "is DRM-protected, so its text cannot be read",
                            hint="use a DRM-free copy of the book")
        opf_path = _package_path(book, names, path)
        package = _xml(book, opf_path, path)
        title, manifest, spine = _parse_package(package, opf_path)
        segments: list[Segment] = []
        inflated = tokens = 0
        for done, href in enumerate(spine, start=1):
            if href not in names:
                continue  # a spine entry missing from the zip: readers skip it too
            def check(chapter_chars: int, done: int = done, before: int = tokens) -> None:
                if budget is not None:  # what this chapter has given so far counts, as it is inflated
                    budget.check(path, before + chapter_chars // 4, done, len(spine), size_bytes or 0)

            text, head_title, headings, size = _chapter(book, href, path, MAX_BOOK_BYTES - inflated, check)
            inflated += size
            tokens += estimate_tokens(text)
            if budget is not None:
                budget.check(path, tokens, done, len(spine), size_bytes or 0)
            if progress:
                progress(path, done, len(spine))
            if not text.strip():
                continue
            number = len(segments) + 1
            chapter_title = headings[0] if headings else head_title or None
            segments.append(Segment(anchor=f"ch.{number}", text=text, chapter=number, title=chapter_title,
                                    path=href))
    if not segments:
        raise Empty(path, "has no readable text in its chapters", hint=_HINT)
    return Document(source=path, kind="epub", title=title or Path(path).stem, segments=segments,
                    content_hash=content_hash,
                    meta={"chapters": len(segments), "manifest_items": manifest, "bytes": size_bytes})


def chapter_sizes(data: BinaryIO, path: str) -> list[tuple[str, int]]:
    """(href, declared uncompressed size) of every spine chapter, without inflating any: for plans."""
    try:
        with zipfile.ZipFile(data) as book:
            names = set(book.namelist())
            opf_path = _package_path(book, names, path)
            _, _, spine = _parse_package(_xml(book, opf_path, path), opf_path)
            return [(href, book.getinfo(href).file_size) for href in spine if href in names]
    except _ZIP_BROKEN as error:
        raise Damaged(path, f"is not a valid EPUB ({error})", hint=_HINT) from None


def _chapter(book: zipfile.ZipFile, href: str, path: str, book_left: int,
             check: Callable[[int], None]) -> tuple[str, str, list[str], int]:
    """(text, <title>, headings, bytes inflated) of one chapter, inflated, decoded and parsed a megabyte at
    a time: never the whole chapter in memory, and `check` sees the text grow."""
    where = f"{path} ({href})"
    cap = min(MAX_CHAPTER_BYTES, book_left)
    reader = HtmlText()
    decoder = None
    head = b""
    size = 0
    try:
        declared = book.getinfo(href).file_size
        with book.open(href) as member:
            while True:
                chunk = member.read(1 << 20)
                size += len(chunk)
                if size > cap:
                    problem = (f"chapter {href} decompresses to more than {human_bytes(cap)}"
                               if cap == MAX_CHAPTER_BYTES else
                               f"its chapters decompress to more than {human_bytes(MAX_BOOK_BYTES)}")
                    raise TooLarge(path, problem, hint="this is not a plausible book: " + _HINT, size_bytes=size)
                if decoder is None:
                    head += chunk
                    if chunk and len(head) < 4096:
                        continue
                    encoding, skip = choose_encoding(head, not chunk or len(head) >= declared, where,
                                                     declared_charset(head))
                    decoder, chunk = _decoder(encoding), head[skip:]
                try:
                    reader.feed(decoder.decode(chunk, final=not chunk))
                except UnicodeError as error:
                    raise BadEncoding(where, f"is not valid {encoding.upper()} text (bad byte near byte "
                                      f"{size - len(chunk) + getattr(error, 'start', 0):,})", hint=_HINT) from None
                check(reader.chars)
                if not chunk:
                    break
    except KeyError:
        raise Damaged(path, f"is not a valid EPUB ({href} is missing)", hint=_HINT) from None
    except RuntimeError as error:  # zipfile: "File ... is encrypted, password required for extraction"
        raise Protected(path, f"is an encrypted zip archive ({error})", hint="use a DRM-free copy of the book") \
            from None
    except _ZIP_BROKEN as error:
        raise Damaged(path, f"is not a valid EPUB ({href}: {error})", hint=_HINT) from None
    text, title, headings = reader.close()
    return text, title, headings, size


def _decode_chapter(markup: bytes, where: str) -> str:
    """XHTML in the encoding it declares (BOM, XML declaration, meta charset), else UTF-8, else detected."""
    encoding, skip = choose_encoding(markup, True, where, declared_charset(markup))
    try:
        return _decoder(encoding).decode(markup[skip:], final=True)
    except UnicodeError as error:
        raise BadEncoding(where, f"is not valid {encoding.upper()} text (bad byte at byte "
                          f"{getattr(error, 'start', 0)})", hint=_HINT) from None


def _member(book: zipfile.ZipFile, name: str, path: str, cap: int, what: str) -> bytes:
    """A zip member, inflated a megabyte at a time and refused once it passes `cap` bytes."""
    parts: list[bytes] = []
    size = 0
    try:
        with book.open(name) as member:
            while chunk := member.read(1 << 20):
                size += len(chunk)
                if size > cap:
                    raise TooLarge(path, f"{what} decompresses to more than {human_bytes(cap)}",
                                   hint="this is not a plausible book: " + _HINT, size_bytes=size)
                parts.append(chunk)
    except KeyError:
        raise Damaged(path, f"is not a valid EPUB ({name} is missing)", hint=_HINT) from None
    except RuntimeError as error:  # zipfile: "File ... is encrypted, password required for extraction"
        raise Protected(path, f"is an encrypted zip archive ({error})", hint="use a DRM-free copy of the book") \
            from None
    except _ZIP_BROKEN as error:
        raise Damaged(path, f"is not a valid EPUB ({name}: {error})", hint=_HINT) from None
    return b"".join(parts)


def _package_path(book: zipfile.ZipFile, names: set[str], path: str) -> str:
    if _CONTAINER in names:
        container = _xml(book, _CONTAINER, path)
        for element in container.iter():
            if isinstance(element.tag, str) and element.tag.endswith("rootfile") and element.get("full-path"):
                return element.get("full-path", "")
    candidates = sorted(name for name in names if name.endswith(".opf"))
    if candidates:
        return candidates[0]
    raise Damaged(path, "is not a valid EPUB (no META-INF/container.xml or .opf package)", hint=_HINT)


def _parse_package(package: ElementTree.Element, opf_path: str) -> tuple[str, int, list[str]]:
    base = posixpath.dirname(opf_path)
    title = ""
    manifest: dict[str, str] = {}
    spine: list[str] = []
    for element in package.iter():
        if not isinstance(element.tag, str):
            continue  # comments and processing instructions
        tag = element.tag.rsplit("}", 1)[-1]
        if tag == "title" and not title and element.text:
            title = " ".join(element.text.split())[:1000]
        elif tag == "item" and element.get("id") and element.get("href"):
            manifest[element.get("id", "")] = posixpath.normpath(
                posixpath.join(base, unquote(element.get("href", "").split("#")[0])))
        elif tag == "itemref" and element.get("idref"):
            spine.append(element.get("idref", ""))
    # A chapter listed twice is read once: repeating one large chapter is a cheap way to blow up a book.
    return title, len(manifest), list(dict.fromkeys(manifest[idref] for idref in spine if idref in manifest))


def _xml(book: zipfile.ZipFile, name: str, path: str) -> ElementTree.Element:
    data = _member(book, name, path, _MAX_XML_BYTES, name)
    try:
        return ElementTree.fromstring(data)
    except (ElementTree.ParseError, ValueError, LookupError) as error:  # LookupError: an unknown encoding
        raise Damaged(path, f"is not a valid EPUB ({name}: {error})", hint=_HINT) from None


def _has_encrypted_content(book: zipfile.ZipFile, path: str) -> bool:
    """encryption.xml also lists obfuscated fonts, which are harmless; anything else is DRM."""
    try:
        root = _xml(book, "META-INF/encryption.xml", path)
    except IngestError:
        return False
    for element in root.iter():
        if isinstance(element.tag, str) and element.tag.endswith("CipherReference"):
            uri = element.get("URI", "").lower()
            if not uri.endswith((".ttf", ".otf", ".woff", ".woff2")):
                return True
    return False
