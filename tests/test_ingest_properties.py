"""Property tests: the repository walker agrees with git about what is ignored and never leaves its
folder; every anchor the renderer prints leads find_passage back to the text under it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from salachat.ingest import Document, Segment, extract_citations, find_passage, read_paths, render_prompt
from salachat.ingest.render import marker
from salachat.ingest.repo import walk_repo

FILE_NAMES = ["a", "b.txt", "c.py", "d.log", "keep.log", "e.md"]
DIR_NAMES = ["x", "y", "sub"]
PATTERNS = ["*.log", "!keep.log", "a", "/b.txt", "x/", "y/c.py", "**/e.md", "sub/**", "!x/a", "*.py",
            "!c.py", "[ab]*", "y", "/sub/a", "*/d.log", "#comment", "", "e.*", "!*.md", "x/*"]

relative_files = st.lists(
    st.tuples(st.lists(st.sampled_from(DIR_NAMES), max_size=2), st.sampled_from(FILE_NAMES)).map(
        lambda parts: "/".join([*parts[0], parts[1]])),
    min_size=1, max_size=12, unique=True)
ignore_files = st.dictionaries(
    st.sampled_from(["", "x", "y", "x/sub", "sub"]), st.lists(st.sampled_from(PATTERNS), max_size=5),
    max_size=3)


def _git_visible(root: Path) -> set[str]:
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    listed = subprocess.run(
        ["git", "-c", "core.excludesFile=/dev/null", "ls-files", "--others", "--exclude-standard", "-z"],
        cwd=root, check=True, capture_output=True, text=True).stdout
    return {path for path in listed.split("\0") if path}


@pytest.mark.skipif(shutil.which("git") is None, reason="git is the reference for .gitignore semantics")
@settings(max_examples=60, deadline=None)
@given(files=relative_files, ignores=ignore_files)
def test_walker_reads_exactly_what_git_does_not_ignore(files, ignores):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for relative in files:
            # A name used both as a file and a folder cannot exist: keep the folder.
            if any(other.startswith(relative + "/") for other in files):
                continue
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_text(f"content of {relative}\n")
        for base, patterns in ignores.items():
            (root / base).mkdir(parents=True, exist_ok=True)
            (root / base / ".gitignore").write_text("\n".join(patterns) + "\n")
        walked, _ = walk_repo(root)
        assert {file.relative for file in walked} == _git_visible(root)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=relative_files, links=st.lists(st.tuples(st.sampled_from(["l1", "x/l2", "y/l3"]),
                                                       st.sampled_from(["out", "out/f.txt", "in", "root",
                                                                        "..", "in/x"])),
                                             max_size=4, unique_by=lambda link: link[0]))
def test_walker_never_reads_outside_its_folder(files, links):
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        (base / "out").mkdir()
        (base / "out" / "f.txt").write_text("OUTSIDE SECRET\n")
        root = base / "repo"
        root.mkdir()
        for relative in files:
            if any(other.startswith(relative + "/") for other in files):
                continue
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_text(f"inside {relative}\n")
        targets = {"out": base / "out", "out/f.txt": base / "out" / "f.txt", "in": root / files[0],
                   "root": root, "..": base, "in/x": root / "x"}
        for link, target in links:
            (root / link).parent.mkdir(parents=True, exist_ok=True)
            if not (root / link).exists() and not (root / link).is_symlink():
                (root / link).symlink_to(targets[target])
        walked, _ = walk_repo(root)
        root_real = os.path.realpath(root)
        for file in walked:
            assert os.path.realpath(file.absolute).startswith(root_real + os.sep)
        try:
            docs = read_paths([root])
        except Exception:  # noqa: BLE001 - a tree of only links may have nothing to read; that is fine
            return
        assert "OUTSIDE SECRET" not in render_prompt(docs)


line_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=30).map(str.rstrip)
path_names = st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True), min_size=1, max_size=3).map(
    "/".join)


@st.composite
def documents(draw) -> list[Document]:
    docs: list[Document] = []
    for index in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["pdf", "epub", "repo", "text"]))
        name = f"doc{index}"
        if kind == "pdf":
            pages = draw(st.lists(line_text, min_size=1, max_size=5))
            segments = [Segment(anchor=f"p.{n}", text=t, page=n) for n, t in enumerate(pages, start=1)]
            docs.append(Document(f"/books/{name}.pdf", "pdf", name, segments, "0" * 64))
        elif kind == "epub":
            chapters = draw(st.lists(st.tuples(line_text, st.from_regex(r"[A-Z][a-z ]{0,12}", fullmatch=True)),
                                     min_size=1, max_size=4))
            segments = [Segment(anchor=f"ch.{n}", text=t, chapter=n, title=title.strip() or None)
                        for n, (t, title) in enumerate(chapters, start=1)]
            docs.append(Document(f"/books/{name}.epub", "epub", name, segments, "0" * 64))
        elif kind == "repo":
            paths = draw(st.lists(path_names, min_size=1, max_size=3, unique=True))
            segments = [Segment(anchor=f"{name}/{p}.py:1", path=f"{name}/{p}.py", line_start=1, numbered=True,
                                text="\n".join(draw(st.lists(line_text, min_size=1, max_size=6))))
                        for p in paths]
            docs.append(Document(f"/src/{name}", "repo", name, segments, "0" * 64))
        else:
            lines = draw(st.lists(line_text, min_size=1, max_size=12))
            cuts = sorted(draw(st.sets(st.integers(1, len(lines)), max_size=3)) | {1})
            segments = []
            for position, start in enumerate(cuts):
                end = cuts[position + 1] - 1 if position + 1 < len(cuts) else len(lines)
                segments.append(Segment(anchor=f"{name}.txt:{start}", path=f"{name}.txt", line_start=start,
                                        text="\n".join(lines[start - 1:end])))
            docs.append(Document(f"/notes/{name}.txt", "text", name, segments, "0" * 64))
    return docs


@settings(max_examples=150, deadline=None)
@given(docs=documents())
def test_every_printed_marker_finds_its_segment(docs):
    prompt = render_prompt(docs)
    qualify = len(docs) > 1
    for doc in docs:
        for segment in doc.segments:
            if segment.numbered:
                continue
            printed = marker(doc, segment, qualify)
            assert f"[{printed}]\n" in prompt
            passage = find_passage(docs, printed)
            assert passage is not None and passage.segment == segment, printed
            if segment.line_start is None:
                assert passage.text == segment.text
            cited = extract_citations(f"As the text says [{printed}].")
            assert cited and find_passage(docs, cited[0]).segment == segment


@settings(max_examples=150, deadline=None)
@given(docs=documents())
def test_every_line_in_the_prompt_is_found_by_counting_on_from_the_last_number(docs):
    """What a model does to cite a line between two numbers: count on from the last "N|" above it."""
    current, number = None, 0
    checked = numbered = 0
    for line in render_prompt(docs).split("\n"):
        if line.startswith("### "):
            current, number = line[4:], 0
            continue
        if line.startswith(("[", "===")):
            current = None  # a page, chapter or section marker, or the next document
            continue
        if current is None:
            continue
        marked = re.match(r"^(\d+)\|(?: (.*))?$", line)
        if marked:
            number, text = int(marked.group(1)), marked.group(2) or ""
            numbered += 1
            anchor = f"{current}:{number}"
            assert extract_citations(f"see [{anchor}]") == [anchor]
        else:
            number, text = number + 1, line
        passage = find_passage(docs, f"{current}:{number}", context_lines=0)
        if text.strip():
            assert passage is not None and passage.text.rstrip() == text.rstrip(), (current, number, line)
            checked += 1
    code_lines = sum(1 for doc in docs for seg in doc.segments if seg.numbered
                     for line in seg.text.split("\n") if line.strip())
    assert checked == code_lines
    assert numbered <= checked
