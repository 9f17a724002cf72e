"""Document ingestion: PDFs, books, text and code repositories into anchored segments the model can cite.

    docs = read_paths(["book.pdf", "src/"], cache_dir=paths.cache_dir())
    prompt = CITE_INSTRUCTION + "\\n\\n" + render_prompt(docs)
    find_passage(docs, "p.12").text
"""

from .anchors import extract_citations, parse_anchor
from .document import Document, Passage, Segment, Skipped
from .errors import IngestError
from .passages import find_passage
from .reader import SUPPORTED, read_path, read_paths
from .render import CITE_INSTRUCTION, render_prompt
from .summary import IngestSummary, count_tokens, estimate_tokens, summarize

__all__ = [
    "CITE_INSTRUCTION", "SUPPORTED", "Document", "IngestError", "IngestSummary", "Passage", "Segment",
    "Skipped", "count_tokens", "estimate_tokens", "extract_citations", "find_passage", "parse_anchor",
    "read_path", "read_paths", "render_prompt", "summarize",
]
