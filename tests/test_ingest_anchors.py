"""Anchor forms the model and the user write, read back into canonical anchors and passages."""

from __future__ import annotations

import pytest
from salachat.ingest import (
    CITE_INSTRUCTION,
    Document,
    Segment,
    extract_citations,
    find_passage,
    render_prompt,
)


def _book() -> Document:
    pages = [Segment(anchor=f"p.{n}", text=f"text of page {n}", page=n) for n in range(1, 21)]
    return Document("/home/u/book.pdf", "pdf", "A Book", pages, "a" * 64)


def _repo() -> Document:
    retry = "\n".join(f"line {n} of retry" for n in range(1, 101))
    segments = [Segment(anchor="README.md:1", text="# Tool\nIntro", path="README.md", line_start=1, numbered=True),
                Segment(anchor="src/net/retry.py:1", text=retry, path="src/net/retry.py", line_start=1,
                        numbered=True)]
    return Document("/home/u/tool", "repo", "tool", segments, "b" * 64)


@pytest.mark.parametrize("written", ["page 12", "p. 12", "p.12", "P12", "[p.12]", "pg 12", "Page 12"])
def test_page_forms_find_the_page(written):
    if written == "pg 12":
        assert find_passage([_book()], written) is None  # not a form we claim to read
        return
    assert find_passage([_book()], written).text == "text of page 12"


@pytest.mark.parametrize("written", ["src/net/retry.py:40", "retry.py line 40", "retry.py:40",
                                     "net/retry.py, line 40", "src/net/retry.py#L40", "[retry.py:40]"])
def test_file_line_forms_find_the_line_with_context(written):
    passage = find_passage([_repo()], written, context_lines=2)
    assert passage.anchor == "src/net/retry.py:40"
    assert passage.text.split("\n") == [f"line {n} of retry" for n in range(38, 43)]
    assert (passage.line_start, passage.line_end) == (38, 42)
    assert passage.source == "/home/u/tool: src/net/retry.py:38-42"


def test_line_ranges_and_edges_are_clipped_to_the_file():
    passage = find_passage([_repo()], "retry.py:99-100", context_lines=5)
    assert (passage.line_start, passage.line_end) == (94, 100)
    assert find_passage([_repo()], "retry.py:101") is None
    assert find_passage([_repo()], "p.21") is None and find_passage([_book()], "p.21") is None


def test_two_documents_qualify_page_anchors_by_file_name():
    other = Document("/x/other.pdf", "pdf", "Other", [Segment("p.12", "other page 12", page=12)], "c" * 64)
    docs = [_book(), other]
    prompt = render_prompt(docs)
    assert "[book.pdf p.12]\ntext of page 12" in prompt and "[other.pdf p.12]\nother page 12" in prompt
    assert find_passage(docs, "other.pdf p.12").text == "other page 12"
    assert find_passage(docs, "other.pdf p.12").source == "/x/other.pdf: other.pdf p.12"
    assert find_passage(docs, "[book.pdf, page 12]").text == "text of page 12"


def test_whole_file_anchor_returns_the_file():
    passage = find_passage([_repo()], "README.md")
    assert passage.text == "# Tool\nIntro" and passage.anchor == "README.md"


def test_citations_are_read_from_a_model_answer_in_order_without_repeats():
    answer = ("Retries back off exponentially [src/net/retry.py:40], capped at 30 s (see retry.py line 52 "
              "and page 12; also [p.3; p.12] and chapter 4, [ch.2 The Storm], [README.md]). "
              "Visit http://localhost:8080 and version 1.2 for details.")
    assert extract_citations(answer) == [
        "src/net/retry.py:40", "retry.py:52", "p.12", "p.3", "ch.4", "ch.2", "README.md"]


def test_citation_of_a_page_range_keeps_the_range():
    assert extract_citations("pages 3-5 say so") == ["p.3-5"]
    assert find_passage([_book()], "pp. 3-5").text == "text of page 3\n\ntext of page 4\n\ntext of page 5"


def test_cite_instruction_names_every_anchor_form():
    for form in ("[p.12]", "[ch.3]", "[path/to/file.py:40]"):
        assert form in CITE_INSTRUCTION
