"""HTML/XHTML to readable text with the standard library: headings become markdown '#' lines, blocks
become paragraphs, scripts and styles are dropped."""

from __future__ import annotations

import re
from html.parser import HTMLParser

_BLOCKS = {"p", "div", "section", "article", "header", "footer", "blockquote", "pre", "table", "tr",
           "ul", "ol", "dl", "dt", "dd", "figure", "figcaption", "aside", "nav", "main", "hr", "br", "li",
           "h1", "h2", "h3", "h4", "h5", "h6", "title", "body", "td", "th"}
_SKIP = {"script", "style", "head", "svg", "math", "noscript", "template"}
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self.headings: list[str] = []
        self._skip_depth = 0
        self._in_title = False
        self._pre_depth = 0
        self._heading: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in _SKIP and tag != "head":
            self._skip_depth += 1
        if tag == "title":
            self._in_title = True
        if tag == "pre":
            self._pre_depth += 1
        if tag in _BLOCKS:
            self.parts.append("\n\n" if tag not in ("br", "li", "tr", "td", "th", "dt", "dd") else "\n")
        if tag in _HEADINGS:
            self.parts.append("#" * _HEADINGS[tag] + " ")
            self._heading = []
        if tag == "li":
            self.parts.append("- ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP and tag != "head" and self._skip_depth:
            self._skip_depth -= 1
        if tag == "title":
            self._in_title = False
        if tag == "pre" and self._pre_depth:
            self._pre_depth -= 1
        if tag in _HEADINGS and self._heading is not None:
            self.headings.append(" ".join("".join(self._heading).split()))
            self._heading = None
        if tag in _BLOCKS:
            self.parts.append("\n\n" if tag not in ("li", "tr", "td", "th", "dt", "dd") else "\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
            return
        if self._skip_depth:
            return
        if not self._pre_depth:
            data = re.sub(r"\s+", " ", data)
        if self._heading is not None:
            self._heading.append(data)
        self.parts.append(data)


def html_to_text(html: str) -> tuple[str, str, list[str]]:
    """Return (text, <title>, headings in order)."""
    parser = _TextParser()
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts)
    lines = [line.rstrip() if line.strip() else "" for line in text.split("\n")]
    # Whitespace collapsing leaves one space at the start of a block; <pre> indentation has more.
    lines = [line[1:] if line.startswith(" ") and not line.startswith("  ") else line for line in lines]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    text = re.sub(r"^(#{1,6}) +", r"\1 ", text, flags=re.MULTILINE)
    return text, " ".join(parser.title.split()), parser.headings
