"""Anchors: how a document is shown to the model (render_prompt), how the model's citations are read back
(extract_citations) and turned into the cited text (find_passage).

Anchor forms, canonical first: "p.12" (PDF page), "ch.3" (EPUB chapter), "src/net/retry.py:40" (a line
of a file), "src/net/retry.py:40-45", "README.md" (a whole file). When several documents share one
prompt, page and chapter anchors carry the document's file name: "book.pdf p.12"."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .document import Document, Passage, Segment

CITE_INSTRUCTION = (
    "Cite the source of every fact in square brackets using the anchors shown in the documents: "
    "[p.12] for a PDF page, [ch.3] for a chapter, [path/to/file.py:40] for line 40 of a file "
    "(the number before '|'), [notes.md:40] for the text section marked so; cite several as [p.3; p.9]."
)

# Shown in the prompt for a PDF page without text, so the model does not invent its content.
NO_TEXT_LAYER = "(no text layer on this page)"


@dataclass(frozen=True)
class Anchor:
    kind: str  # "page" | "chapter" | "line" | "file"
    doc: str | None = None  # a document's file name, when the citation names one
    number: int | None = None  # page, chapter or line number
    end: int | None = None  # last page or line of a range
    path: str | None = None

    def __str__(self) -> str:
        prefix = f"{self.doc} " if self.doc else ""
        span = f"-{self.end}" if self.end and self.end != self.number else ""
        if self.kind == "page":
            return f"{prefix}p.{self.number}{span}"
        if self.kind == "chapter":
            return f"{prefix}ch.{self.number}"
        if self.kind == "line":
            return f"{self.path}:{self.number}{span}"
        return str(self.path)


def render_prompt(docs: list[Document]) -> str:
    """All documents as one text with anchor markers the model can cite."""
    qualify = len(docs) > 1
    parts = []
    for index, doc in enumerate(docs, start=1):
        parts.append(_document_header(doc, index, len(docs)))
        parts.extend(render_segment(doc, segment, qualify) for segment in doc.segments)
    return "\n\n".join(parts) + "\n"


def render_segment(doc: Document, segment: Segment, qualify: bool = False) -> str:
    if segment.numbered:
        start = segment.line_start or 1
        lines = segment.text.split("\n")
        numbered = "\n".join(f"{start + offset}| {line}".rstrip() for offset, line in enumerate(lines))
        return f"### {segment.path}\n{numbered}"
    text = segment.text if segment.text.strip() or segment.page is None else NO_TEXT_LAYER
    return f"[{marker(doc, segment, qualify)}]\n{text}"


def marker(doc: Document, segment: Segment, qualify: bool = False) -> str:
    """The anchor as printed in the prompt (without brackets)."""
    prefix = f"{doc.label} " if qualify else ""
    if segment.page is not None:
        return f"{prefix}p.{segment.page}"
    if segment.chapter is not None:
        title = f" {segment.title}" if segment.title else ""
        return f"{prefix}ch.{segment.chapter}{title}"
    return segment.anchor


def _document_header(doc: Document, index: int, total: int) -> str:
    size = {"pdf": f"{len(doc.segments)} pages", "epub": f"{len(doc.segments)} chapters",
            "repo": f"{len(doc.segments)} files"}.get(doc.kind, doc.kind)
    return f"=== Document {index} of {total}: {doc.title} ({doc.label}, {size}) ==="


_NUM = r"(\d{1,6})"
_RANGE = rf"{_NUM}(?:\s*[-–]\s*{_NUM})?"
_DOC = r"(?:(?P<doc>[\w.+-]+\.(?:pdf|epub))[\s,:]+)?"
_PAGE = re.compile(rf"{_DOC}(?<![\w.])(?:pages?|pp?\.?)\s*{_RANGE}(?![\w.]*\w)", re.IGNORECASE)
_CHAPTER = re.compile(rf"{_DOC}(?<![\w.])(?:chapter|ch\.?)\s*{_NUM}(?!\d)", re.IGNORECASE)
_PATH = r"(?P<path>(?:[\w.+@~-]+/)*[\w+@~-][\w.+@~-]*\.[A-Za-z][\w+-]{0,9})"
_LINE = re.compile(
    rf"(?<![\w/.-]){_PATH}(?::{_RANGE}|,?\s+(?:lines?|l\.)\s*{_RANGE}|#L{_NUM}(?:-L{_NUM})?)(?!\d)",
    re.IGNORECASE)
_BARE_LINE = re.compile(rf"^\s*(?:lines?|l\.)\s*{_RANGE}\s*$", re.IGNORECASE)
_BRACKETS = re.compile(r"\[([^\[\]\n]{1,200})\]")


def parse_anchor(text: str) -> Anchor | None:
    """Read one anchor, however written: "p. 12", "page 12", "book.pdf p.12", "chapter 3", "ch.3 Title",
    "src/x.py:40", "x.py line 40", "x.py#L40", "line 40", "README.md"."""
    text = text.strip().strip("[]()").strip()
    found = _first_match(text)
    if found:
        return found
    # Extensionless files (LICENSE:12, Makefile:3) are only recognised when the whole string is one anchor.
    plain = re.fullmatch(rf"(?P<path>[^\s:,\[\]]+)(?::|,?\s+(?:lines?|l\.)\s*){_RANGE}", text, re.IGNORECASE)
    if plain and not plain.group("path").isdigit():
        return Anchor("line", path=plain.group("path"), number=int(plain.group(2)), end=_int(plain.group(3)))
    bare = _BARE_LINE.match(text)
    if bare:
        return Anchor("line", number=int(bare.group(1)), end=_int(bare.group(2)))
    path = re.fullmatch(r"(?:[\w.+@~-]+/)*[\w.+@~-]+", text)
    return Anchor("file", path=text) if path and not text.isdigit() else None


def _first_match(text: str) -> Anchor | None:
    matches = [anchor for anchor, _ in _all_matches(text)]
    return matches[0] if matches else None


def _all_matches(text: str) -> list[tuple[Anchor, int]]:
    found: list[tuple[Anchor, int]] = []
    line_spans: list[tuple[int, int]] = []
    for match in _LINE.finditer(text):
        numbers = [int(group) for group in match.groups()[1:] if group]
        found.append((Anchor("line", path=match.group("path"), number=numbers[0],
                             end=numbers[1] if len(numbers) > 1 else None), match.start()))
        line_spans.append(match.span())
    for match in _PAGE.finditer(text):
        if not _inside(match.start(), line_spans):
            found.append((Anchor("page", doc=match.group("doc"), number=int(match.group(2)),
                                 end=_int(match.group(3))), match.start()))
    for match in _CHAPTER.finditer(text):
        if not _inside(match.start(), line_spans):
            found.append((Anchor("chapter", doc=match.group("doc"), number=int(match.group(2))),
                          match.start()))
    return sorted(found, key=lambda item: item[1])


def _inside(position: int, spans: list[tuple[int, int]]) -> bool:
    return any(start <= position < end for start, end in spans)


def _int(group: str | None) -> int | None:
    return int(group) if group else None


def extract_citations(answer: str) -> list[str]:
    """Canonical anchors cited in a model's answer, in order of first appearance, without repeats."""
    anchors: list[str] = []
    for anchor, _ in _all_matches(answer):
        anchors.append(str(anchor))
    for match in _BRACKETS.finditer(answer):
        for piece in re.split(r"[;,]", match.group(1)):
            anchor = parse_anchor(piece)
            if anchor and (anchor.kind == "line" or (anchor.kind == "file" and "." in (anchor.path or ""))):
                anchors.append(str(anchor))
    return list(dict.fromkeys(anchors))


def find_passage(docs: list[Document], anchor: str, context_lines: int = 3) -> Passage | None:
    """The text an anchor points at, or None when no document has it."""
    parsed = parse_anchor(anchor)
    if parsed is None:
        return _by_title(docs, anchor)
    if parsed.kind == "page":
        return _numbered_segment(docs, parsed, "page")
    if parsed.kind == "chapter":
        return _numbered_segment(docs, parsed, "chapter") or _by_title(docs, anchor)
    if parsed.kind == "file":
        return _whole_file(docs, parsed) or _by_title(docs, anchor)
    return _lines(docs, parsed, context_lines)


def _numbered_segment(docs: list[Document], anchor: Anchor, field: str) -> Passage | None:
    last = anchor.end if anchor.end and anchor.end >= (anchor.number or 0) else anchor.number
    for doc in _named(docs, anchor.doc):
        hits = [seg for seg in doc.segments if getattr(seg, field) is not None
                and anchor.number <= getattr(seg, field) <= last]
        if hits:
            text = "\n\n".join(seg.text for seg in hits)
            return Passage(document=doc, segment=hits[0], anchor=str(anchor), text=text)
    return None


def _named(docs: list[Document], name: str | None) -> list[Document]:
    if not name:
        return docs
    return [doc for doc in docs if doc.label.lower() == name.lower()]


def _by_title(docs: list[Document], text: str) -> Passage | None:
    wanted = " ".join(text.strip().strip("[]").split()).lower()
    for doc in docs:
        for segment in doc.segments:
            if segment.title and segment.title.lower() == wanted:
                return Passage(document=doc, segment=segment, anchor=segment.anchor, text=segment.text)
    return None


def _file_segments(docs: list[Document], path: str | None) -> tuple[Document, list[Segment]] | None:
    """Segments of the file a path names: exact path first, then a path suffix, then the file name."""
    if path is None:
        for doc in docs:
            lined = [seg for seg in doc.segments if seg.line_start is not None]
            if lined:
                first_path = lined[0].path
                return doc, [seg for seg in lined if seg.path == first_path]
        return None
    path = path.lstrip("./") if path.startswith("./") else path
    for matches in (lambda p: p == path, lambda p: p.endswith("/" + path),
                    lambda p: p.rsplit("/", 1)[-1] == path.rsplit("/", 1)[-1]):
        for doc in docs:
            hits = [seg for seg in doc.segments if seg.path and seg.line_start is not None and matches(seg.path)]
            if hits:
                first_path = hits[0].path
                return doc, [seg for seg in hits if seg.path == first_path]
    return None


def _whole_file(docs: list[Document], anchor: Anchor) -> Passage | None:
    found = _file_segments(docs, anchor.path)
    if not found:
        return None
    doc, segments = found
    text = "\n".join(seg.text for seg in segments)
    return Passage(document=doc, segment=segments[0], anchor=segments[0].path or "", text=text,
                   line_start=segments[0].line_start, line_end=segments[-1].line_end)


def _lines(docs: list[Document], anchor: Anchor, context_lines: int) -> Passage | None:
    found = _file_segments(docs, anchor.path)
    if not found or anchor.number is None:
        return None
    doc, segments = found
    by_number: dict[int, str] = {}
    for segment in segments:
        for offset, line in enumerate(segment.text.split("\n")):
            by_number[(segment.line_start or 1) + offset] = line
    last = anchor.end if anchor.end and anchor.end >= anchor.number else anchor.number
    if not min(by_number) <= anchor.number <= max(by_number):
        return None
    first_shown = max(anchor.number - context_lines, min(by_number))
    last_shown = min(last + context_lines, max(by_number))
    text = "\n".join(by_number.get(number, "") for number in range(first_shown, last_shown + 1))
    # The last segment starting at or before the line (a blank line between sections belongs to none).
    containing = [seg for seg in segments if (seg.line_start or 1) <= anchor.number][-1]
    canonical = Anchor("line", path=containing.path, number=anchor.number, end=anchor.end)
    return Passage(document=doc, segment=containing, anchor=str(canonical), text=text,
                   line_start=first_shown, line_end=last_shown)
