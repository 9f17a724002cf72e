"""Repositories: real package trees (the stdlib json package, the installed pathspec) and small trees
built here to prove each skip rule."""

from __future__ import annotations

import inspect
import json
import json.decoder
import os
from pathlib import Path

import pathspec
import pathspec.gitignore
import pytest
from salachat.ingest import IngestError, find_passage, read_paths, render_prompt
from salachat.ingest.repo import walk_repo


def test_stdlib_json_package_functions_are_at_their_lines():
    doc = read_paths([Path(json.__file__).parent])[0]
    assert doc.kind == "repo" and doc.title == "json"
    paths = [segment.path for segment in doc.segments]
    assert paths == sorted(paths) and {"__init__.py", "decoder.py", "encoder.py", "scanner.py"} <= set(paths)
    assert "__pycache__/" in {item.path for item in doc.skipped}
    # inspect is the independent witness of where each definition starts.
    dumps_line = inspect.getsourcelines(json.dumps)[1]
    assert find_passage([doc], f"__init__.py:{dumps_line}", context_lines=0).text.startswith("def dumps(")
    decoder_line = inspect.getsourcelines(json.decoder.JSONDecoder)[1]
    passage = find_passage([doc], f"decoder.py line {decoder_line}", context_lines=0)
    assert passage.text.startswith("class JSONDecoder") and passage.anchor == f"decoder.py:{decoder_line}"
    assert f"\n{dumps_line}| def dumps(" in render_prompt([doc])


def test_installed_pathspec_package_reads_as_a_repository():
    root = Path(pathspec.__file__).parent
    doc = read_paths([root])[0]
    line = inspect.getsourcelines(pathspec.gitignore.GitIgnoreSpec)[1]
    relative = Path(inspect.getsourcefile(pathspec.gitignore)).relative_to(root).as_posix()
    assert find_passage([doc], f"{relative}:{line}", context_lines=0).text.startswith("class GitIgnoreSpec")
    assert doc.meta["files"] == len(doc.segments) >= 10
    assert all(not segment.path.endswith(".pyc") for segment in doc.segments)


def _tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


def test_gitignore_at_every_level_with_negation(tmp_path):
    root = _tree(tmp_path / "repo", {
        ".gitignore": "*.log\n!keep.log\nsecret/\n",
        "app.py": "print(1)\n", "debug.log": "x\n", "keep.log": "kept\n",
        "secret/key.txt": "hidden\n",
        "pkg/.gitignore": "generated_*.py\n!generated_ok.py\n",
        "pkg/core.py": "x = 1\n", "pkg/generated_a.py": "y = 2\n", "pkg/generated_ok.py": "z = 3\n",
        "pkg/deep/.gitignore": "/local.txt\n", "pkg/deep/local.txt": "no\n", "pkg/deep/mod.py": "w = 4\n",
        "other/local.txt": "yes\n",
    })
    files, skipped = walk_repo(root)
    assert {file.relative for file in files} == {
        ".gitignore", "app.py", "keep.log", "pkg/.gitignore", "pkg/core.py", "pkg/generated_ok.py",
        "pkg/deep/.gitignore", "pkg/deep/mod.py", "other/local.txt"}
    reasons = {item.path: item.reason for item in skipped}
    assert reasons["debug.log"] == reasons["secret/"] == reasons["pkg/generated_a.py"] == "ignored by .gitignore"
    assert reasons["pkg/deep/local.txt"] == "ignored by .gitignore"


def test_vendored_generated_binary_secret_large_and_empty_files_are_skipped_with_reasons(tmp_path):
    root = _tree(tmp_path / "repo", {
        "main.py": "print('hi')\n",
        "node_modules/lib/index.js": "x\n", "build/out.txt": "x\n", ".venv/bin/python": "x\n",
        "src/__pycache__/m.cpython-311.pyc": b"\x00\x01", ".git/HEAD": "ref: refs/heads/main\n",
        "logo.png": b"\x89PNG\r\n\x1a\n\x00\x00", "data.txt": b"abc\x00\x00\x01\x02binary",
        ".env": "TOKEN=abc\n", "package-lock.json": "{}\n", "huge.txt": "a" * 2_000, "empty.py": "",
    })
    doc = read_paths([root], max_file_bytes=1_000)[0]
    assert [segment.path for segment in doc.segments] == ["main.py"]
    reasons = {item.path: item.reason for item in doc.skipped}
    assert reasons["node_modules/"] == "vendored dependencies"
    assert reasons["build/"] == "generated" and reasons["src/__pycache__/"] == "generated"
    assert reasons[".venv/"] == "virtual environment" and reasons[".git/"] == "version-control data"
    assert reasons["logo.png"] == "binary (.png)" and reasons["data.txt"] == "binary (NUL or control bytes)"
    assert reasons[".env"] == "looks like a credential" and reasons["package-lock.json"] == "lock file (generated)"
    assert reasons["huge.txt"] == "larger than the 1,000-byte limit (2,000 bytes)"
    assert reasons["empty.py"] == "empty"


def test_symlinks_never_lead_outside_the_folder(tmp_path):
    outside = _tree(tmp_path / "outside", {"passwords.txt": "do not read\n", "dir/a.txt": "nor this\n"})
    root = _tree(tmp_path / "repo", {"main.py": "x = 1\n", "sub/inner.txt": "inside\n"})
    (root / "escape.txt").symlink_to(outside / "passwords.txt")
    (root / "escape_dir").symlink_to(outside / "dir")
    (root / "inner_link.txt").symlink_to(root / "sub" / "inner.txt")
    (root / "loop").symlink_to(root)
    (root / "dangling.txt").symlink_to(tmp_path / "nowhere")
    doc = read_paths([root])[0]
    assert "do not read" not in render_prompt([doc]) and "nor this" not in render_prompt([doc])
    assert sorted(segment.path for segment in doc.segments) == ["inner_link.txt", "main.py", "sub/inner.txt"]
    reasons = {item.path: item.reason for item in doc.skipped}
    assert reasons["escape.txt"].startswith("symbolic link leads outside the folder")
    assert reasons["escape_dir"].startswith("symbolic link leads outside the folder")
    assert reasons["loop"].startswith("symbolic link to a folder")
    assert reasons["dangling.txt"] == "broken symbolic link"


def test_readme_then_docs_then_source_by_path(tmp_path):
    root = _tree(tmp_path / "repo", {
        "zeta.py": "z\n", "README.md": "# Project\n", "docs/guide.md": "guide\n", "CHANGES.md": "c\n",
        "src/a.py": "a\n", "src/README.md": "inner\n", "alpha.py": "a\n",
    })
    doc = read_paths([root])[0]
    assert [segment.path for segment in doc.segments] == [
        "README.md", "CHANGES.md", "docs/guide.md", "alpha.py", "src/README.md", "src/a.py", "zeta.py"]
    assert render_prompt([doc]).split("\n")[2:4] == ["### README.md", "1| # Project"]


def test_repository_hash_follows_file_contents_not_timestamps(tmp_path):
    root = _tree(tmp_path / "repo", {"a.py": "x = 1\n", "b/c.py": "y = 2\n"})
    first = read_paths([root])[0].content_hash
    os.utime(root / "a.py", (1, 1))
    assert read_paths([root])[0].content_hash == first
    (root / "a.py").write_text("x = 2\n")
    assert read_paths([root])[0].content_hash != first


def test_folder_with_nothing_readable_says_what_was_skipped(tmp_path):
    root = _tree(tmp_path / "repo", {"image.png": b"\x89PNG", "node_modules/x.js": "x"})
    with pytest.raises(IngestError) as caught:
        read_paths([root])
    assert str(caught.value).startswith(f"{root}: has no readable text files; everything was skipped (")


def test_progress_counts_files(tmp_path):
    root = _tree(tmp_path / "repo", {f"m{n}.py": f"x = {n}\n" for n in range(4)})
    calls = []
    read_paths([root], progress=lambda label, done, total: calls.append((label, done, total)))
    assert calls == [(str(root), n, 4) for n in range(1, 5)]


def test_git_info_exclude_is_honoured_and_a_git_file_is_not_read(tmp_path):
    root = _tree(tmp_path / "repo", {"main.py": "x = 1\n", "scratch.txt": "mine\n",
                                     ".git/info/exclude": "scratch.txt\n"})
    worktree = _tree(tmp_path / "worktree", {"main.py": "x = 1\n", ".git": "gitdir: /elsewhere/.git\n"})
    assert [segment.path for segment in read_paths([root])[0].segments] == ["main.py"]
    assert [segment.path for segment in read_paths([worktree])[0].segments] == ["main.py"]


def test_double_star_pattern_ignores_the_inside_of_a_folder_not_the_folder(tmp_path):
    # Found by the git-agreement property: git re-includes sub/e.md here, so sub/ must be entered.
    root = _tree(tmp_path / "repo", {".gitignore": "sub/**\n!*.md\n", "sub/e.md": "kept\n",
                                     "sub/code.py": "x\n", "sub/deeper/f.md": "gone\n"})
    files, _ = walk_repo(root)
    assert {file.relative for file in files} == {".gitignore", "sub/e.md"}
