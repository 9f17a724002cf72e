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


# What the product reads when the caller does not pass what its model can take: a few million tokens, more
# than any shipped model's context, so the engine (which knows the model) has the last word on fitting.
DEFAULT_MAX_TOKENS = 4_000_000


def load_documents(paths: list[Path], password: str | None = None, progress=None, *,
                   max_tokens: int | None = DEFAULT_MAX_TOKENS) -> Documents:
    """Read `paths`; a reading longer than `max_tokens` is refused as soon as that shows, with the size,
    an estimate in tokens and the limit (exit code 3), long before a huge file has been read whole."""
    from salachat import ingest
    from salachat.paths import cache_dir

    try:
        docs = ingest.read_paths(list(paths), password=password, progress=progress, cache_dir=cache_dir(),
                                 max_tokens=max_tokens)
    except ingest.IngestError as e:
        raise UserError(str(e), errors.BAD_INPUT) from None
    # The prompt always has a header line per document, so ask the documents, not the prompt, for text.
    if not any(segment.text.strip() for doc in docs for segment in doc.segments):
        names = ", ".join(str(p) for p in paths)
        raise UserError(f"{names}: no text to read (a scanned PDF needs OCR first)", errors.BAD_INPUT)
    text = ingest.render_prompt(docs)
    return Documents(docs, text)


def plan_documents(paths: list[Path], *, max_tokens: int | None = DEFAULT_MAX_TOKENS, password: str | None = None):
    """What reading `paths` would take (ingest.ReadPlan: .lines(), .to_dict(), .fits), computed from sizes,
    a folder walk and small samples before anything is read whole. It never raises for a bad path: show
    the plan, then `check_plan(plan)` raises the UserError (exit code 3) for an unreadable path or a
    reading that cannot fit."""
    from salachat import ingest

    return ingest.plan_paths(list(paths), max_tokens=max_tokens, password=password)


def check_plan(plan) -> None:
    """The plan's refusal as a UserError with exit code 3, or nothing when it can be read."""
    error = plan.refusal()
    if error is not None:
        raise UserError(str(error), errors.BAD_INPUT)


def cited_passages(documents: Documents, answer: str) -> list:
    """The passages (ingest.Passage: .anchor, .source, .text) that the answer cites and the documents hold."""
    from salachat import ingest
    found = []
    for anchor in ingest.extract_citations(answer):
        passage = ingest.find_passage(documents.docs, anchor)
        if passage is not None:
            found.append(passage)
    return found
