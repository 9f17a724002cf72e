"""Document ingestion: PDFs, books, text and code repositories into anchored segments the model can cite.

    plan = plan_paths(["book.pdf", "src/"], max_tokens=context)  # cheap: sizes, estimates, skips, anchors
    plan.check()  # an unreadable path or a reading too long for the model, refused before reading
    docs = read_paths(["book.pdf", "src/"], cache_dir=paths.cache_dir(), max_tokens=context)
    prompt = CITE_INSTRUCTION + "\\n\\n" + render_prompt(docs)
    find_passage(docs, "p.12").text
"""

from .anchors import extract_citations, parse_anchor
from .document import Document, Passage, Segment, Skipped
from .errors import (
                     BadEncoding,
                     Binary,
                     Damaged,
                     Empty,
                     IngestError,
                     NotFound,
                     PermissionDenied,
                     Protected,
                     TooLarge,
                     Unexpected,
                     Unsupported,
)
from .passages import find_passage
from .plan import PlanItem, PlannedFile, ReadPlan, plan_path, plan_paths
from .reader import SUPPORTED, read_path, read_paths
from .render import CITE_INSTRUCTION, render_prompt
from .stream import DEFAULT_MAX_TOKENS, HARD_MAX_TOKENS, MAX_INPUT_BYTES
from .summary import IngestSummary, count_tokens, estimate_tokens, summarize

__all__ = [
    "CITE_INSTRUCTION", "DEFAULT_MAX_TOKENS", "HARD_MAX_TOKENS", "MAX_INPUT_BYTES", "SUPPORTED", "BadEncoding",
    "Binary", "Damaged", "Document", "Empty", "IngestError", "IngestSummary", "NotFound", "Passage",
    "PermissionDenied", "PlanItem", "PlannedFile", "Protected", "ReadPlan", "Segment", "Skipped", "TooLarge",
    "Unexpected", "Unsupported", "count_tokens", "estimate_tokens", "extract_citations", "find_passage",
    "parse_anchor", "plan_path", "plan_paths", "read_path", "read_paths", "render_prompt", "summarize",
]
