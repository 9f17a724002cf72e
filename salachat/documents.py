"""The product's view of ingest: read the user's paths into one prompt text, with errors as user errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from salachat import errors
from salachat.errors import UserError


@dataclass
class Documents:
    docs: list  # ingest.Document
    prompt_text: str

    def summary(self) -> list[dict]:
        return [
            {
                "source": d.source,
                "kind": d.kind,
                "title": d.title,
                "segments": len(d.segments),
                "content_hash": d.content_hash,
                "skipped": len(d.skipped),
            }
            for d in self.docs
        ]


def load_documents(paths: list[Path], password: str | None = None, progress=None) -> Documents:
    from salachat import ingest
    from salachat.paths import cache_dir

    try:
        docs = ingest.read_paths(list(paths), password=password, progress=progress, cache_dir=cache_dir())
    except ingest.IngestError as e:
        raise UserError(str(e), errors.BAD_INPUT) from None
    text = ingest.render_prompt(docs)
    if not text.strip():
        names = ", ".join(str(p) for p in paths)
        raise UserError(f"{names}: no text to read (a scanned PDF needs OCR first)", errors.BAD_INPUT)
    return Documents(docs, text)


def cited_passages(documents: Documents, answer: str) -> list:
    """The passages (ingest.Passage: .anchor, .source, .text) that the answer cites and the documents hold."""
    from salachat import ingest
    found = []
    for anchor in ingest.extract_citations(answer):
        passage = ingest.find_passage(documents.docs, anchor)
        if passage is not None:
            found.append(passage)
    return found
