"""The one shape every reader produces: a Document made of anchored Segments."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Segment:
    """A citable piece of a document.

    `anchor` is what the model cites: "p.12" (PDF page), "ch.3" (EPUB chapter), "src/net/retry.py:1"
    (a code file, starting at line 1) or "notes.md:40" (a prose section starting at line 40).
    Line-addressed segments keep `line_start` so that "file:47" can be found inside them.
    """

    anchor: str
    text: str
    page: int | None = None
    path: str | None = None
    line_start: int | None = None
    title: str | None = None
    chapter: int | None = None
    numbered: bool = False  # rendered with "N| " line numbers (code) rather than a single marker (prose)

    @property
    def line_end(self) -> int | None:
        if self.line_start is None:
            return None
        return self.line_start + max(self.text.count("\n") + 1, 1) - 1


@dataclass(frozen=True)
class Skipped:
    """A file (or folder) that was not read, and why, so the user can see what the model never saw."""

    path: str
    reason: str


@dataclass
class Document:
    source: str
    kind: str
    title: str
    segments: list[Segment]
    content_hash: str
    meta: dict[str, Any] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    pages_without_text: int = 0

    @property
    def label(self) -> str:
        """Short name used to qualify anchors when several documents share one prompt."""
        return Path(self.source).name or self.source

    @property
    def text_chars(self) -> int:
        return sum(len(segment.text) for segment in self.segments)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Document:
        fields = dict(data)
        fields["segments"] = [Segment(**segment) for segment in data["segments"]]
        fields["skipped"] = [Skipped(**skipped) for skipped in data["skipped"]]
        return cls(**fields)


@dataclass(frozen=True)
class Passage:
    """What find_passage returns: the cited text and where it came from."""

    document: Document = field(repr=False)
    segment: Segment = field(repr=False)
    anchor: str  # canonical form of the anchor that was asked for, e.g. "src/net/retry.py:40"
    text: str
    line_start: int | None = None
    line_end: int | None = None

    @property
    def source(self) -> str:
        """Where the passage is, for the user: "book.pdf p.12", "tool src/net/retry.py:40-46"."""
        if self.line_start is not None and self.segment.path:
            return f"{self.document.source}: {self.segment.path}:{self.line_start}-{self.line_end}"
        return f"{self.document.source}: {self.anchor}"
