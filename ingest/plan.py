"""What a reading would take, before the expensive work: files, sizes, estimated tokens, what is skipped
and why, and how anchors will look, from stat() calls, a folder walk and small samples (the first 64 KB
of a text, the first megabyte of a page, three pages of a PDF, two chapters of a book). A plan that
does not fit the model's limit gives the refusal to raise before anything is read in full.

    plan = plan_paths(["book.pdf", "src/"], max_tokens=model_context)
    print("\\n".join(plan.lines()))
    plan.check()  # raises the first IngestError (unreadable path, or too long) or returns
"""

from __future__ import annotations

import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .document import Skipped
from .errors import Binary, Damaged, IngestError, Unexpected
from .html_text import HtmlText, declared_charset
from .prose import _empty
from .reader import detect_kind, open_input
from .render import ANCHOR_EVERY
from .repo import MAX_FILE_BYTES, walk_named
from .stream import Budget, Input, choose_encoding, estimate_tokens, has_binary, human_bytes

_TEXT_SAMPLE = 65536
_HTML_SAMPLE = 1 << 20
_PDF_SAMPLE_PAGES = 3


@dataclass
class PlannedFile:
    path: str
    bytes: int
    tokens: int  # estimated


@dataclass
class PlanItem:
    source: str
    kind: str  # pdf, epub, text, markdown, rst, html, code, repo, or "?" when it cannot be read
    bytes: int  # on disk; decompressed when known
    tokens: int  # estimated
    units: int | None = None  # pages, chapters or files
    files: list[PlannedFile] = field(default_factory=list)  # a folder's files, in reading order
    skipped: list[Skipped] = field(default_factory=list)
    anchors: list[str] = field(default_factory=list)  # what citations into it will look like
    anchor_rule: str = ""
    error: str | None = None  # one line: why this path cannot be read at all
    _exception: IngestError | None = field(default=None, repr=False, compare=False)

    @property
    def unit_name(self) -> str:
        return {"pdf": "pages", "epub": "chapters", "repo": "files"}.get(self.kind, "")


@dataclass
class ReadPlan:
    items: list[PlanItem]
    tokens: int
    max_tokens: int

    @property
    def fits(self) -> bool:
        return self.tokens <= self.max_tokens and not any(item.error for item in self.items)

    def refusal(self) -> IngestError | None:
        """The error to raise instead of reading: the first unreadable path, else the length refusal."""
        for item in self.items:
            if item._exception is not None:
                return item._exception
        if self.tokens > self.max_tokens:
            budget = Budget(self.max_tokens)
            used = 0
            for item in self.items:  # name the document that takes the reading past the limit
                if used + item.tokens > budget.limit:
                    budget.used = used
                    return budget.refusal(item.source, item.tokens, item.bytes)
                used += item.tokens
        return None

    def check(self) -> None:
        error = self.refusal()
        if error is not None:
            raise error

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for item in data["items"]:
            item.pop("_exception", None)
        data["fits"] = self.fits
        return data

    def lines(self, max_listed: int = 20) -> list[str]:
        """Plain lines for a terminal: each path with its size and estimate, then what is skipped. A path
        that cannot be read is not listed (refusal() gives its one line), so a plan of only such paths
        prints nothing before that line."""
        out: list[str] = []
        readable = [item for item in self.items if not item.error]
        if not readable:
            return out
        for item in readable:
            units = f", {item.units:,} {item.unit_name}" if item.units is not None and item.unit_name else ""
            out.append(f"{item.source} ({item.kind}{units}): {human_bytes(item.bytes)}, "
                       f"about {item.tokens:,} tokens")
            for planned in item.files[:max_listed]:
                out.append(f"    read {planned.path} ({human_bytes(planned.bytes)}, ~{planned.tokens:,} tokens)")
            if len(item.files) > max_listed:
                out.append(f"    … and {len(item.files) - max_listed:,} more files")
            for skipped in item.skipped[:max_listed]:
                out.append(f"    skipped {skipped.path}: {skipped.reason}")
            if len(item.skipped) > max_listed:
                out.append(f"    … and {len(item.skipped) - max_listed:,} more skipped")
            if item.anchors:
                out.append(f"    anchors: {', '.join(item.anchors)}" + (f" ({item.anchor_rule})"
                                                                         if item.anchor_rule else ""))
        verdict = "fits" if self.tokens <= self.max_tokens else "does NOT fit"  # the refusal follows
        out.append(f"total about {self.tokens:,} tokens (estimated); {verdict} the limit of "
                   f"{self.max_tokens:,} tokens")
        return out


def plan_paths(paths: list[str | Path], max_tokens: int | None = None, max_file_bytes: int = MAX_FILE_BYTES,
               password: str | None = None) -> ReadPlan:
    """A ReadPlan for `paths`; never raises for a bad path (its item carries the error instead)."""
    limit = Budget(max_tokens).limit or 0
    items = [plan_path(path, max_file_bytes, password) for path in paths]
    return ReadPlan(items=items, tokens=sum(item.tokens for item in items), max_tokens=limit)


def plan_path(path: str | Path, max_file_bytes: int = MAX_FILE_BYTES, password: str | None = None) -> PlanItem:
    try:
        return _plan(path, max_file_bytes, password)
    except IngestError as error:
        return PlanItem(str(path), "?", 0, 0, error=str(error), _exception=error)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:  # noqa: BLE001 - a plan must say what it could not judge, not crash
        wrapped = Unexpected(str(path), f"could not be examined ({type(error).__name__}: {error})",
                             hint="if the file opens elsewhere, please report this as a salachat bug")
        return PlanItem(str(path), "?", 0, 0, error=str(wrapped), _exception=wrapped)


def _plan(path: str | Path, max_file_bytes: int, password: str | None) -> PlanItem:
    opened = open_input(path)
    if isinstance(opened, Path):
        return _plan_repo(opened, str(path), max_file_bytes)
    inp = opened
    head = inp.head(_HTML_SAMPLE)
    kind = detect_kind(inp.name, head, inp.source)
    size = inp.expected_size() or inp.size
    if inp.compressed and size < len(head):
        size = len(head)
    if kind == "pdf":
        return _plan_pdf(inp, password)
    if kind == "epub":
        return _plan_epub(inp)
    name = inp.name
    complete = len(head) >= size
    encoding, skip = choose_encoding(head if complete else head[:_TEXT_SAMPLE], complete, inp.source,
                                     declared_charset(head) if kind == "html" else None)
    text = head[skip:].decode(encoding, errors="replace")
    if has_binary(text):  # what the reading would refuse, said now when the first megabyte shows it
        raise Binary(inp.source, "contains binary data (NUL or control bytes) in its first megabyte",
                     hint="pass the original document (PDF, EPUB, text) instead, or cut the binary part")
    if kind == "html":
        reader = HtmlText()
        reader.feed(text)
        text = reader.close()[0]
    if complete and not text.strip():
        raise _empty(inp.source, kind)
    tokens = estimate_tokens(text) * size // max(len(head), 1)
    if kind == "code":
        rule = f"lines numbered at block starts and at least every {ANCHOR_EVERY}"
    else:
        rule = "a marker at each heading and at least every 60 lines" + (" of the text" if kind == "html" else "")
    return PlanItem(inp.source, kind, size, tokens, anchors=[f"{name}:1"], anchor_rule=rule)


def _plan_repo(root: Path, source: str, max_file_bytes: int) -> PlanItem:
    files, skipped = walk_named(root, source, max_file_bytes)
    planned = [PlannedFile(file.relative, file.size, (file.size + 3) // 4) for file in files]
    item = PlanItem(source, "repo", sum(file.bytes for file in planned), sum(file.tokens for file in planned),
                    units=len(planned), files=planned, skipped=skipped,
                    anchors=[f"{file.path}:1" for file in planned[:3]],
                    anchor_rule=f"lines numbered at block starts and at least every {ANCHOR_EVERY}; files "
                    "holding a private key or token, or minified lines, are skipped when read")
    return item


def _plan_pdf(inp: Input, password: str | None) -> PlanItem:
    from .pdf import _open, _page_text, _PypdfComplaints

    with _PypdfComplaints(), inp.seekable() as (handle, _):  # pypdf's log lines stay off stderr
        reader = _open(handle, inp.source, password)
        pages = len(reader.pages)
        sample = sorted({1, (pages + 1) // 2, pages} - {0})[:_PDF_SAMPLE_PAGES]
        tokens = sum(estimate_tokens(_page_text(reader, number, inp.source)) for number in sample)
    estimate = tokens * pages // max(len(sample), 1)
    return PlanItem(inp.source, "pdf", inp.expected_size() or inp.size, estimate, units=pages,
                    anchors=["p.1", f"p.{pages}"] if pages > 1 else ["p.1"],
                    anchor_rule="a marker at each page, by physical page number")


def _plan_epub(inp: Input) -> PlanItem:
    from .epub import MAX_CHAPTER_BYTES, _decode_chapter, _member, chapter_sizes

    with inp.seekable() as (handle, _):
        sizes = chapter_sizes(handle, inp.source)
        handle.seek(0)
        sampled_bytes = sampled_tokens = 0
        try:
            with zipfile.ZipFile(handle) as book:
                for href, _size in sorted(sizes, key=lambda item: -item[1])[:2]:
                    markup = _member(book, href, inp.source, MAX_CHAPTER_BYTES, f"chapter {href}")
                    reader = HtmlText()
                    reader.feed(_decode_chapter(markup, f"{inp.source} ({href})"))
                    sampled_tokens += estimate_tokens(reader.close()[0])
                    sampled_bytes += len(markup)
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise Damaged(inp.source, f"is not a valid EPUB ({error})",
                          hint="open it in an e-book reader and export it again") from None
    total = sum(size for _, size in sizes)
    tokens = sampled_tokens * total // max(sampled_bytes, 1)
    return PlanItem(inp.source, "epub", inp.expected_size() or inp.size, tokens, units=len(sizes),
                    anchors=["ch.1", f"ch.{len(sizes)}"] if len(sizes) > 1 else ["ch.1"],
                    anchor_rule="a marker at each chapter of the spine, with its title")
