"""find_passage: from an anchor, however written, to the text it points at."""

from __future__ import annotations

from .anchors import Anchor, parse_anchor
from .document import Document, Passage, Segment


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
