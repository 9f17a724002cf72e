"""EPUB with the standard library: container.xml names the OPF package, whose spine orders the XHTML
chapters. Each non-empty spine item becomes one Segment anchored "ch.N"."""

from __future__ import annotations

import io
import posixpath
import zipfile
from pathlib import Path
from urllib.parse import unquote
from xml.etree import ElementTree

from .document import Document, Segment
from .errors import IngestError
from .html_text import html_to_text

_CONTAINER = "META-INF/container.xml"
_MAX_CHAPTER_BYTES = 64 * 1024 * 1024  # a zip bomb guard: no real chapter is this large
_HINT = "the EPUB may be damaged: open it in an e-book reader and export it again"


def read_epub(data: bytes, path: str, content_hash: str) -> Document:
    try:
        book = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise IngestError(path, "is not a valid EPUB (it is not a zip archive)", hint=_HINT) from None
    with book:
        names = set(book.namelist())
        if "META-INF/encryption.xml" in names and _has_encrypted_content(book):
            raise IngestError(path, "is DRM-protected, so its text cannot be read",
                              hint="use a DRM-free copy of the book")
        opf_path = _package_path(book, names, path)
        package = _xml(book, opf_path, path)
        title, manifest, spine = _parse_package(package, opf_path)
        segments: list[Segment] = []
        for href in spine:
            if href not in names:
                continue  # a spine entry missing from the zip: readers skip it too
            info = book.getinfo(href)
            if info.file_size > _MAX_CHAPTER_BYTES:
                raise IngestError(path, f"chapter {href} is implausibly large", hint=_HINT)
            markup = book.read(href).decode("utf-8", errors="replace")
            text, head_title, headings = html_to_text(markup)
            if not text.strip():
                continue
            number = len(segments) + 1
            chapter_title = headings[0] if headings else head_title or None
            segments.append(Segment(anchor=f"ch.{number}", text=text, chapter=number, title=chapter_title,
                                    path=href))
    if not segments:
        raise IngestError(path, "has no readable text in its chapters", hint=_HINT)
    return Document(source=path, kind="epub", title=title or Path(path).stem, segments=segments,
                    content_hash=content_hash, meta={"chapters": len(segments), "manifest_items": manifest})


def _package_path(book: zipfile.ZipFile, names: set[str], path: str) -> str:
    if _CONTAINER in names:
        container = _xml(book, _CONTAINER, path)
        for element in container.iter():
            if element.tag.endswith("rootfile") and element.get("full-path"):
                return element.get("full-path", "")
    candidates = sorted(name for name in names if name.endswith(".opf"))
    if candidates:
        return candidates[0]
    raise IngestError(path, "is not a valid EPUB (no META-INF/container.xml or .opf package)", hint=_HINT)


def _parse_package(package: ElementTree.Element, opf_path: str) -> tuple[str, int, list[str]]:
    base = posixpath.dirname(opf_path)
    title = ""
    manifest: dict[str, str] = {}
    spine: list[str] = []
    for element in package.iter():
        tag = element.tag.rsplit("}", 1)[-1]
        if tag == "title" and not title and element.text:
            title = " ".join(element.text.split())
        elif tag == "item" and element.get("id") and element.get("href"):
            manifest[element.get("id", "")] = posixpath.normpath(
                posixpath.join(base, unquote(element.get("href", "").split("#")[0])))
        elif tag == "itemref" and element.get("idref"):
            spine.append(element.get("idref", ""))
    return title, len(manifest), [manifest[idref] for idref in spine if idref in manifest]


def _xml(book: zipfile.ZipFile, name: str, path: str) -> ElementTree.Element:
    try:
        return ElementTree.fromstring(book.read(name))
    except KeyError:
        raise IngestError(path, f"is not a valid EPUB ({name} is missing)", hint=_HINT) from None
    except (ElementTree.ParseError, zipfile.BadZipFile, EOFError) as error:
        raise IngestError(path, f"is not a valid EPUB ({name}: {error})", hint=_HINT) from None


def _has_encrypted_content(book: zipfile.ZipFile) -> bool:
    """encryption.xml also lists obfuscated fonts, which are harmless; anything else is DRM."""
    try:
        root = ElementTree.fromstring(book.read("META-INF/encryption.xml"))
    except (ElementTree.ParseError, KeyError):
        return False
    for element in root.iter():
        if element.tag.endswith("CipherReference"):
            uri = element.get("URI", "").lower()
            if not uri.endswith((".ttf", ".otf", ".woff", ".woff2")):
                return True
    return False
