"""Anchors as people and models write them, read back into canonical form: "p.12" (PDF page), "ch.3"
(EPUB chapter), "src/net/retry.py:40" or "src/net/retry.py:40-45" (lines of a file), "README.md" (a whole
file), optionally prefixed by a document's file name ("book.pdf p.12")."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Anchor:
    kind: str  # "page" | "chapter" | "line" | "file"
    doc: str | None = None  # a document's file name, when the citation names one
    number: int | None = None  # page, chapter or line number
    end: int | None = None  # last page or line of a range
    path: str | None = None

    def __str__(self) -> str:
        prefix = f"{self.doc} " if self.doc else ""
        span = f"-{self.end}" if self.end and self.end != self.number else ""
        if self.kind == "page":
            return f"{prefix}p.{self.number}{span}"
        if self.kind == "chapter":
            return f"{prefix}ch.{self.number}"
        if self.kind == "line":
            return f"{self.path}:{self.number}{span}"
        return str(self.path)


_NUM = r"(\d{1,6})"
_RANGE = rf"{_NUM}(?:\s*[-–]\s*{_NUM})?"
_DOC = r"(?:(?P<doc>[\w.+-]+\.(?:pdf|epub))[\s,:]+)?"
_PAGE = re.compile(rf"{_DOC}(?<![\w.])(?:pages?|pp?\.?)\s*{_RANGE}(?![\w.]*\w)", re.IGNORECASE)
_CHAPTER = re.compile(rf"{_DOC}(?<![\w.])(?:chapter|ch\.?)\s*{_NUM}(?!\d)", re.IGNORECASE)
_PATH = r"(?P<path>(?:[\w.+@~-]+/)*[\w+@~-][\w.+@~-]*\.[A-Za-z][\w+-]{0,9})"
_LINE = re.compile(
    rf"(?<![\w/.-]){_PATH}(?::{_RANGE}|,?\s+(?:lines?|l\.)\s*{_RANGE}|#L{_NUM}(?:-L{_NUM})?)(?!\d)",
    re.IGNORECASE)
_BARE_LINE = re.compile(rf"^\s*(?:lines?|l\.)\s*{_RANGE}\s*$", re.IGNORECASE)
_BRACKETS = re.compile(r"\[([^\[\]\n]{1,200})\]")


def parse_anchor(text: str) -> Anchor | None:
    """Read one anchor, however written: "p. 12", "page 12", "book.pdf p.12", "chapter 3", "ch.3 Title",
    "src/x.py:40", "x.py line 40", "x.py#L40", "line 40", "README.md"."""
    text = text.strip().strip("[]()").strip()
    found = _first_match(text)
    if found:
        return found
    # Extensionless files (LICENSE:12, Makefile:3) are only recognised when the whole string is one anchor.
    plain = re.fullmatch(rf"(?P<path>[^\s:,\[\]]+)(?::|,?\s+(?:lines?|l\.)\s*){_RANGE}", text, re.IGNORECASE)
    if plain and not plain.group("path").isdigit():
        return Anchor("line", path=plain.group("path"), number=int(plain.group(2)), end=_int(plain.group(3)))
    bare = _BARE_LINE.match(text)
    if bare:
        return Anchor("line", number=int(bare.group(1)), end=_int(bare.group(2)))
    path = re.fullmatch(r"(?:[\w.+@~-]+/)*[\w.+@~-]+", text)
    return Anchor("file", path=text) if path and not text.isdigit() else None


def _first_match(text: str) -> Anchor | None:
    matches = [anchor for anchor, _ in _all_matches(text)]
    return matches[0] if matches else None


def _all_matches(text: str) -> list[tuple[Anchor, int]]:
    found: list[tuple[Anchor, int]] = []
    line_spans: list[tuple[int, int]] = []
    for match in _LINE.finditer(text):
        numbers = [int(group) for group in match.groups()[1:] if group]
        found.append((Anchor("line", path=match.group("path"), number=numbers[0],
                             end=numbers[1] if len(numbers) > 1 else None), match.start()))
        line_spans.append(match.span())
    for match in _PAGE.finditer(text):
        if not _inside(match.start(), line_spans):
            found.append((Anchor("page", doc=match.group("doc"), number=int(match.group(2)),
                                 end=_int(match.group(3))), match.start()))
    for match in _CHAPTER.finditer(text):
        if not _inside(match.start(), line_spans):
            found.append((Anchor("chapter", doc=match.group("doc"), number=int(match.group(2))),
                          match.start()))
    return sorted(found, key=lambda item: item[1])


def _inside(position: int, spans: list[tuple[int, int]]) -> bool:
    return any(start <= position < end for start, end in spans)


def _int(group: str | None) -> int | None:
    return int(group) if group else None


def extract_citations(answer: str) -> list[str]:
    """Canonical anchors cited in a model's answer, in order of first appearance, without repeats."""
    anchors: list[str] = []
    for anchor, _ in _all_matches(answer):
        anchors.append(str(anchor))
    for match in _BRACKETS.finditer(answer):
        for piece in re.split(r"[;,]", match.group(1)):
            anchor = parse_anchor(piece)
            if anchor and (anchor.kind == "line" or (anchor.kind == "file" and "." in (anchor.path or ""))):
                anchors.append(str(anchor))
    return list(dict.fromkeys(anchors))
