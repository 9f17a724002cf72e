"""HTML/XHTML to readable text with the standard library: headings become markdown '#' lines, blocks
become paragraphs, scripts and styles are dropped. The parser takes markup a piece at a time, so a
large page is never held whole, and declared_charset finds the encoding a page or chapter declares."""

from __future__ import annotations

import re
from html.parser import HTMLParser

_BLOCKS = {"p", "div", "section", "article", "header", "footer", "blockquote", "pre", "table", "tr",
           "ul", "ol", "dl", "dt", "dd", "figure", "figcaption", "aside", "nav", "main", "hr", "br", "li",
           "h1", "h2", "h3", "h4", "h5", "h6", "title", "body", "td", "th"}
_SKIP = {"script", "style", "head", "svg", "math", "noscript", "template"}
_MAX_TITLE = 1000  # characters kept of a <title> or heading; the text itself keeps all of it
_COMPACT_PARTS = 8192  # join small pieces this often: a list of millions of tiny strings costs ~60 B each
_META_CHARSET = re.compile(rb"""<meta\b[^>]*?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)
_XML_ENCODING = re.compile(rb"""^\s*<\?xml\b[^>]*?encoding\s*=\s*["']([A-Za-z0-9_.:-]+)""", re.IGNORECASE)
_SPACES = re.compile(r"\s+")
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.blocks: list[str] = []  # compacted parts
        self.chars = 0  # characters of text so far
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
            if len(self.title) < _MAX_TITLE:
                self.title += data[:_MAX_TITLE]
            return
        if self._skip_depth:
            return
        if not self._pre_depth:
            data = _SPACES.sub(" ", data)
        if self._heading is not None and sum(map(len, self._heading)) < _MAX_TITLE:
            self._heading.append(data[:_MAX_TITLE])
        self.parts.append(data)
        self.chars += len(data)
        if len(self.parts) > _COMPACT_PARTS:
            self.blocks.append("".join(self.parts))
            self.parts.clear()

    def text(self) -> str:
        return "".join(self.blocks) + "".join(self.parts)


class HtmlText:
    """Markup in, a piece at a time; `chars` says how much text has come out so far."""

    def __init__(self) -> None:
        self._parser = _TextParser()

    @property
    def chars(self) -> int:
        return self._parser.chars

    def feed(self, markup: str) -> None:
        self._parser.feed(markup)

    def close(self) -> tuple[str, str, list[str]]:
        """(text, <title>, headings in order)."""
        parser = self._parser
        parser.close()
        text = parser.text()
        parser.parts, parser.blocks = [], []
        return _tidy(text), " ".join(parser.title.split()), [h[:_MAX_TITLE] for h in parser.headings]


def html_to_text(html: str) -> tuple[str, str, list[str]]:
    """Return (text, <title>, headings in order)."""
    reader = HtmlText()
    reader.feed(html)
    return reader.close()


def declared_charset(head: bytes) -> str | None:
    """The encoding the first bytes of a page declare: a UTF-16 XML declaration (seen by its byte
    pattern, as the XML specification's appendix F does), <?xml encoding=...?> or <meta charset>."""
    if head.startswith(b"<\x00?\x00"):
        return "utf-16-le"
    if head.startswith(b"\x00<\x00?"):
        return "utf-16-be"
    head = head[:4096]
    found = _XML_ENCODING.match(head) or _META_CHARSET.search(head)
    return found.group(1).decode("ascii") if found else None


def _tidy(text: str) -> str:
    lines = [line.rstrip() if line.strip() else "" for line in text.split("\n")]
    # Whitespace collapsing leaves one space at the start of a block; <pre> indentation has more.
    lines = [line[1:] if line.startswith(" ") and not line.startswith("  ") else line for line in lines]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    return re.sub(r"^(#{1,6}) +", r"\1 ", text, flags=re.MULTILINE)
