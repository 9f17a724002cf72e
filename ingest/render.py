"""How documents are shown to the model: each PDF page, chapter and text section starts with a marker the
model can cite ("[p.12]", "[ch.3 Title]", "[notes.md:40]"); code files sit under "### path" headers with
line numbers ("40| code") at the first line, at the start of each block after a blank line and at least
every ANCHOR_EVERY lines, the lines between printed as they are: a number on every line cost one small
repository 13K tokens, and a line between two numbers is still found by counting on from the last one.
When several documents share one prompt, page and chapter markers carry the document's file name
("[book.pdf p.12]")."""

from __future__ import annotations

import re
from collections.abc import Iterator

from .document import Document, Segment

CITE_INSTRUCTION = (
    "Cite the source of every fact in square brackets using the anchors shown in the documents: "
    "[p.12] for a PDF page, [ch.3] for a chapter, [path/to/file.py:40] for line 40 of a file "
    "(lines marked '40| ' show their number; count on from the last marked line for the lines after it), "
    "[notes.md:40] for the text section marked so; cite several as [p.3; p.9]."
)
ANCHOR_EVERY = 10  # the most lines between two numbered lines of a file
ANCHOR_BLOCK_GAP = 4  # a block start gets a number once this many lines have passed since the last
# Lines that would read as a line number, a file header, a document header or a marker if printed bare:
# they always get their number, so every "N|" in the prompt is a true line number.
_LOOKS_MARKED = re.compile(r"^(?:\d+\||###|===|\[)")
_MARK_STARTS = frozenset("0123456789#=[")

# Shown in the prompt for a PDF page without text, so the model does not invent its content.
NO_TEXT_LAYER = "(no text layer on this page)"


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
        numbered = "\n".join(anchored_lines(segment.text.split("\n"), segment.line_start or 1))
        return f"### {segment.path}\n{numbered}"
    text = segment.text if segment.text.strip() or segment.page is None else NO_TEXT_LAYER
    return f"[{marker(doc, segment, qualify)}]\n{text}"


def anchored_lines(lines: list[str], start: int = 1) -> Iterator[str]:
    """The lines of a file as the model sees them: some numbered "N| line", the rest as they are."""
    since = ANCHOR_EVERY  # lines since the last numbered one
    after_blank = False
    for offset, line in enumerate(lines):
        line = line.rstrip()
        if not line:
            after_blank = True
            since += 1
            yield ""
            continue
        if (since >= ANCHOR_EVERY or (after_blank and since >= ANCHOR_BLOCK_GAP)
                or (line[0] in _MARK_STARTS and _LOOKS_MARKED.match(line))):
            since = 1
            yield f"{start + offset}| {line}"
        else:
            since += 1
            yield line
        after_blank = False


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
