"""What would be read, before anything reaches the model: files, pages, tokens, what was skipped and why,
and rough memory and time for the prefill."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .document import Document
from .render import render_prompt
from .stream import estimate_tokens

Encode = Callable[[str], list[int]]
# Defaults are placeholders for the CLI to replace with the loaded model's figures:
# 128 KiB is the fp16 KV cache of a Llama-3-8B token (2 x 32 layers x 8 KV heads x 128 x 2 bytes).
DEFAULT_BYTES_PER_TOKEN = 131_072
DEFAULT_TOKENS_PER_SECOND = 2_000.0


def count_tokens(docs: list[Document], tokenizer_encode: Encode) -> int:
    """Exact token count of the prompt render_prompt would build, with the model's tokenizer."""
    return len(tokenizer_encode(render_prompt(docs)))


@dataclass
class DocumentSummary:
    source: str
    kind: str
    title: str
    segments: int
    pages: int | None
    files: int | None
    chapters: int | None
    tokens: int
    pages_without_text: int
    skipped: list[dict[str, str]]
    cached: bool


@dataclass
class IngestSummary:
    documents: list[DocumentSummary]
    tokens: int
    tokens_exact: bool  # counted with the model's tokenizer, not estimated
    estimated_memory_bytes: int
    estimated_seconds: float
    bytes_per_token: int
    tokens_per_second: float
    skipped: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(docs: list[Document], tokenizer_encode: Encode | None = None,
              bytes_per_token: int = DEFAULT_BYTES_PER_TOKEN,
              tokens_per_second: float = DEFAULT_TOKENS_PER_SECOND) -> IngestSummary:
    summaries = []
    for doc in docs:
        rendered = render_prompt([doc])
        tokens = len(tokenizer_encode(rendered)) if tokenizer_encode else estimate_tokens(rendered)
        summaries.append(DocumentSummary(
            source=doc.source, kind=doc.kind, title=doc.title, segments=len(doc.segments),
            pages=len(doc.segments) if doc.kind == "pdf" else None,
            files=len(doc.segments) if doc.kind == "repo" else None,
            chapters=len(doc.segments) if doc.kind == "epub" else None,
            tokens=tokens, pages_without_text=doc.pages_without_text,
            skipped=[{"path": item.path, "reason": item.reason} for item in doc.skipped],
            cached=bool(doc.meta.get("cached"))))
    total = sum(item.tokens for item in summaries)
    notes = [f"{item.source}: {item.pages_without_text} of {item.pages} pages have no text layer "
             "(scanned images?); they are not read (no OCR)" for item in summaries if item.pages_without_text]
    return IngestSummary(documents=summaries, tokens=total, tokens_exact=tokenizer_encode is not None,
                         estimated_memory_bytes=total * bytes_per_token,
                         estimated_seconds=total / tokens_per_second if tokens_per_second > 0 else 0.0,
                         bytes_per_token=bytes_per_token, tokens_per_second=tokens_per_second,
                         skipped=sum(len(item.skipped) for item in summaries), notes=notes)
