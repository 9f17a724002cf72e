"""Plain text, Markdown, reStructuredText and HTML: sections anchored by "name:line" so the model can
cite a place and find_passage can show it. Headings start sections; long stretches are cut at blank
lines so that anchors stay close together. For HTML the line numbers are those of the extracted text
(what the model sees), not of the markup."""

from __future__ import annotations

import re
from pathlib import Path

from .document import Document, Segment
from .errors import Empty
from .html_text import html_to_text
from .textio import decode_text

MAX_SECTION_LINES = 60  # a marker about this often (at most twice as far) keeps citations precise
_MD_HEADING = re.compile(r"^#{1,6}\s+\S")
_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+:.])\1{2,}\s*$")


def read_prose(data: bytes, path: str, kind: str, content_hash: str) -> Document:
    """Bytes already in memory (the streaming reader in reader.py builds the same Document)."""
    text, encoding = decode_text(data, path)
    title = ""
    if kind == "html":
        text, title, _ = html_to_text(text)
    return prose_document(text, path, kind, content_hash, encoding, title)


def prose_document(text: str, path: str, kind: str, content_hash: str, encoding: str, title: str = "") -> Document:
    """Decoded text (for HTML: the text extracted from it) cut into sections under "name:line" anchors."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    name = Path(path[:-3] if path.lower().endswith(".gz") else path).name
    lines = text.split("\n")
    starts = section_starts(lines, "markdown" if kind == "html" else kind)
    segments = []
    for index, start in enumerate(starts):
        end = starts[index + 1] if index + 1 < len(starts) else len(lines)
        body = "\n".join(lines[start:end]).rstrip("\n")
        if body.strip():
            segments.append(Segment(anchor=f"{name}:{start + 1}", text=body, path=name,
                                    line_start=start + 1, title=_heading(lines[start])))
    if not segments:
        raise _empty(path, kind)
    title = title or _first_heading(lines, kind) or Path(name).stem
    return Document(source=path, kind=kind, title=title, segments=segments, content_hash=content_hash,
                    meta={"encoding": encoding, "lines": len(lines)})


def read_code_file(data: bytes, path: str, content_hash: str) -> Document:
    """A single source file given on its own: numbered lines, as in a repository."""
    text, encoding = decode_text(data, path)
    return code_document(text, path, content_hash, encoding)


def code_document(text: str, path: str, content_hash: str, encoding: str) -> Document:
    name = Path(path[:-3] if path.lower().endswith(".gz") else path).name
    text = text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")
    if not text.strip():
        raise _empty(path, "code")
    segment = Segment(anchor=f"{name}:1", text=text, path=name, line_start=1, numbered=True)
    return Document(source=path, kind="code", title=name, segments=[segment], content_hash=content_hash,
                    meta={"encoding": encoding, "lines": text.count("\n") + 1})


def _empty(path: str, kind: str) -> Empty:
    what = "no text (only markup and whitespace)" if kind == "html" else "no text (only whitespace)"
    return Empty(path, f"has {what}", hint="check that this is the right file and that it was saved fully")


def section_starts(lines: list[str], kind: str) -> list[int]:
    """0-based line numbers where a section begins; always starts with 0."""
    headings = _heading_lines(lines, kind)
    starts = [0]
    for number in range(1, len(lines)):
        since = number - starts[-1]
        # Cut at a paragraph break once a section is long; text without breaks is cut regardless.
        if number in headings or since >= 2 * MAX_SECTION_LINES or (
                since >= MAX_SECTION_LINES and not lines[number - 1].strip() and lines[number].strip()):
            starts.append(number)
    return starts


def _heading_lines(lines: list[str], kind: str) -> set[int]:
    found: set[int] = set()
    if kind in ("markdown", "html"):
        in_fence = False
        for number, line in enumerate(lines):
            if line.lstrip().startswith(("```", "~~~")):
                in_fence = not in_fence
            elif not in_fence and _MD_HEADING.match(line):
                found.add(number)
    elif kind == "rst":
        for number in range(1, len(lines)):
            title = lines[number - 1].strip()
            if title and _RST_UNDERLINE.match(lines[number]) and len(lines[number].strip()) >= len(title):
                overline = number >= 2 and _RST_UNDERLINE.match(lines[number - 2])
                found.add(number - 2 if overline else number - 1)
    return found


def _heading(line: str) -> str | None:
    stripped = line.strip()
    if _MD_HEADING.match(stripped):
        return stripped.lstrip("#").strip()
    return None


def _first_heading(lines: list[str], kind: str) -> str | None:
    for number in sorted(_heading_lines(lines, kind)):
        line = lines[number].strip()
        if _RST_UNDERLINE.match(line):  # rst overline: the title is the next line
            line = lines[number + 1].strip()
        return line.lstrip("#").strip() or None
    return None
