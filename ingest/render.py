"""How documents are shown to the model: each PDF page, chapter and text section starts with a marker the
model can cite ("[p.12]", "[ch.3 Title]", "[notes.md:40]"); code files sit under "### path" headers with
numbered lines ("40| code"). When several documents share one prompt, page and chapter markers carry the
document's file name ("[book.pdf p.12]")."""

from __future__ import annotations

from .document import Document, Segment

CITE_INSTRUCTION = (
    "Cite the source of every fact in square brackets using the anchors shown in the documents: "
    "[p.12] for a PDF page, [ch.3] for a chapter, [path/to/file.py:40] for line 40 of a file "
    "(the number before '|'), [notes.md:40] for the text section marked so; cite several as [p.3; p.9]."
)

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
