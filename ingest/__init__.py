"""Document ingestion: PDFs, books, text and code repositories into anchored segments the model can cite.

    docs = read_paths(["book.pdf", "src/"], cache_dir=paths.cache_dir())
    prompt = CITE_INSTRUCTION + "\\n\\n" + render_prompt(docs)
    find_passage(docs, "p.12").text
"""

from .anchors import CITE_INSTRUCTION, extract_citations, find_passage, parse_anchor, render_prompt
from .document import Document, Passage, Segment, Skipped
from .errors import IngestError
from .reader import SUPPORTED, read_path, read_paths
from .summary import IngestSummary, count_tokens, estimate_tokens, summarize

__all__ = [
    "CITE_INSTRUCTION", "SUPPORTED", "Document", "IngestError", "IngestSummary", "Passage", "Segment",
    "Skipped", "count_tokens", "estimate_tokens", "extract_citations", "find_passage", "parse_anchor",
    "read_path", "read_paths", "render_prompt", "summarize",
]
