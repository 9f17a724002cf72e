"""A folder or git checkout as one Document: .gitignore files at every level are honoured, vendored,
generated, binary and oversized files are skipped (and listed, with the reason), symlinks never lead
out of the folder. README and docs come first, then the rest by path; each file is one numbered
Segment anchored "path:1"."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pathspec

from .document import Document, Segment, Skipped
from .errors import IngestError
from .textio import decode_text, looks_binary

Progress = Callable[[str, int, int], None]
MAX_FILE_BYTES = 1_000_000
SKIPPED_DIRS = {
    ".git": "version-control data", ".hg": "version-control data", ".svn": "version-control data",
    "node_modules": "vendored dependencies", "vendor": "vendored dependencies",
    "bower_components": "vendored dependencies", "site-packages": "vendored dependencies",
    ".venv": "virtual environment", "venv": "virtual environment", ".tox": "virtual environment",
    ".nox": "virtual environment", "__pycache__": "generated", "dist": "generated", "build": "generated",
    "target": "generated", ".eggs": "generated", ".mypy_cache": "generated", ".pytest_cache": "generated",
    ".ruff_cache": "generated", ".hypothesis": "generated", ".next": "generated", ".cache": "generated",
    ".gradle": "generated", ".idea": "editor settings", ".vscode": "editor settings",
}
BINARY_SUFFIXES = {
    ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".ico", ".webp", ".tif", ".tiff", ".psd", ".mp3", ".mp4",
    ".wav", ".ogg", ".flac", ".avi", ".mov", ".mkv", ".zip", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z",
    ".rar", ".tar", ".jar", ".war", ".whl", ".egg", ".pyc", ".pyo", ".pyd", ".so", ".dylib", ".dll",
    ".exe", ".o", ".a", ".lib", ".obj", ".class", ".bin", ".dat", ".db", ".sqlite", ".npy", ".npz",
    ".pt", ".pth", ".ckpt", ".safetensors", ".gguf", ".onnx", ".pkl", ".pickle", ".h5", ".parquet",
    ".arrow", ".ttf", ".otf", ".woff", ".woff2", ".eot", ".pdf", ".epub", ".docx", ".xlsx", ".pptx",
    ".odt", ".dmg", ".iso", ".img", ".wasm",
}
GENERATED_FILES = {"package-lock.json", "yarn.lock", "pnpm-lock.yaml", "poetry.lock", "Cargo.lock",
                   "uv.lock", "Pipfile.lock", "composer.lock", "Gemfile.lock", "go.sum"}
SECRET_FILES = {".env", ".netrc", ".pypirc", "id_rsa", "id_ed25519", "credentials.json"}
SECRET_SUFFIXES = {".pem", ".key", ".p12", ".pfx"}
_DOC_DIRS = {"doc", "docs", "documentation"}


@dataclass(frozen=True)
class RepoFile:
    relative: str  # posix path inside the repository: what anchors and headers show
    absolute: Path


@dataclass(frozen=True)
class _Ignore:
    base: str  # posix folder of the .gitignore, "" for the root
    spec: pathspec.GitIgnoreSpec


def walk_repo(root: Path, max_file_bytes: int = MAX_FILE_BYTES) -> tuple[list[RepoFile], list[Skipped]]:
    """Files to read, in reading order, and what was left out and why."""
    root_real = Path(os.path.realpath(root))
    files: list[RepoFile] = []
    skipped: list[Skipped] = []
    ignores = _read_ignore(root / ".git" / "info" / "exclude", "")
    _walk(root, root_real, "", ignores, files, skipped, max_file_bytes)
    files.sort(key=lambda file: (_reading_rank(file.relative), file.relative))
    return files, skipped


def _walk(folder: Path, root_real: Path, relative: str, ignores: list[_Ignore], files: list[RepoFile],
          skipped: list[Skipped], max_file_bytes: int) -> None:
    ignores = ignores + _read_ignore(folder / ".gitignore", relative)
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as error:
        skipped.append(Skipped(relative or ".", f"folder could not be listed ({error.strerror})"))
        return
    for entry in entries:
        path = f"{relative}/{entry.name}" if relative else entry.name
        try:
            is_link = entry.is_symlink()
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError as error:
            skipped.append(Skipped(path, f"could not be examined ({error.strerror})"))
            continue
        if entry.name in SKIPPED_DIRS and (is_dir or entry.name == ".git"):  # .git is a file in worktrees
            skipped.append(Skipped(path + "/", SKIPPED_DIRS[entry.name]))
            continue
        if entry.name.endswith(".egg-info") and is_dir:
            skipped.append(Skipped(path + "/", "generated"))
            continue
        if _ignored(path, is_dir or (is_link and os.path.isdir(entry.path)), ignores):
            skipped.append(Skipped(path + ("/" if is_dir else ""), "ignored by .gitignore"))
            continue
        if is_link:
            reason = _symlink_problem(Path(entry.path), root_real)
            if reason:
                skipped.append(Skipped(path, reason))
                continue
        if is_dir:
            _walk(Path(entry.path), root_real, path, ignores, files, skipped, max_file_bytes)
            continue
        reason = _file_problem(entry, max_file_bytes)
        if reason:
            skipped.append(Skipped(path, reason))
        else:
            files.append(RepoFile(path, Path(entry.path)))


def _read_ignore(path: Path, base: str) -> list[_Ignore]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return [_Ignore(base, pathspec.GitIgnoreSpec.from_lines(lines))] if lines else []


def _ignored(path: str, is_dir: bool, ignores: list[_Ignore]) -> bool:
    """Git semantics: the deepest .gitignore with a matching pattern decides, and within a file the last
    matching pattern; an ignored folder is never entered, so nothing inside it can be re-included."""
    decision = None
    for ignore in ignores:
        if ignore.base and not path.startswith(ignore.base + "/"):
            continue
        inner = path[len(ignore.base) + 1:] if ignore.base else path
        verdict = _folder_verdict(ignore.spec, inner + "/") if is_dir else ignore.spec.check_file(inner).include
        if verdict is not None:
            decision = verdict
    return bool(decision)


def _folder_verdict(spec: pathspec.GitIgnoreSpec, folder: str) -> bool | None:
    """Last matching pattern wins, as git decides for a folder. pathspec matches "sub/**" against
    "sub/" itself, but in git that pattern means what is *inside* sub, so sub must still be entered
    (a later "!*.md" can re-include files there)."""
    verdict = None
    for pattern in spec.patterns:
        if pattern.include is None or pattern.regex is None:
            continue
        match = pattern.regex.match(folder)
        if match is None:
            continue
        if match.end() == len(folder) and str(pattern.pattern).rstrip().endswith("/**"):
            continue
        verdict = pattern.include
    return verdict


def _symlink_problem(link: Path, root_real: Path) -> str | None:
    target = Path(os.path.realpath(link))
    if not target.exists():
        return "broken symbolic link"
    if target != root_real and root_real not in target.parents:
        return "symbolic link leads outside the folder (not followed)"
    if target.is_dir():
        return "symbolic link to a folder (not followed, its files are read where they live)"
    return None


def _file_problem(entry: os.DirEntry, max_file_bytes: int) -> str | None:
    name = entry.name
    suffix = PurePosixPath(name).suffix.lower()
    if name in SECRET_FILES or suffix in SECRET_SUFFIXES:
        return "may hold secrets"
    if name in GENERATED_FILES or name.endswith((".min.js", ".min.css", ".map")):
        return "generated"
    if suffix in BINARY_SUFFIXES:
        return f"binary ({suffix})"
    try:
        size = entry.stat().st_size
    except OSError as error:
        return f"could not be examined ({error.strerror})"
    if size > max_file_bytes:
        return f"larger than the {max_file_bytes:,}-byte limit ({size:,} bytes)"
    if size == 0:
        return "empty"
    return None


def _reading_rank(relative: str) -> int:
    """README first, then documentation, then everything else (by path)."""
    parts = relative.split("/")
    if len(parts) == 1 and parts[0].lower().startswith("readme"):
        return 0
    if parts[0].lower() in _DOC_DIRS or (len(parts) == 1 and parts[0].lower().endswith((".md", ".rst"))):
        return 1
    return 2


def read_repo(root: Path, source: str, progress: Progress | None = None,
              max_file_bytes: int = MAX_FILE_BYTES) -> Document:
    files, skipped = walk_repo(root, max_file_bytes)
    segments: list[Segment] = []
    digests: list[str] = []
    for done, file in enumerate(files, start=1):
        segment, digest, reason = _read_file(file)
        if reason:
            skipped.append(Skipped(file.relative, reason))
        else:
            segments.append(segment)
            digests.append(f"{file.relative}\0{digest}\n")
        if progress:
            progress(source, done, len(files))
    if not segments:
        raise IngestError(source, "has no readable text files", hint=_empty_hint(skipped))
    content_hash = hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()
    title = Path(os.path.realpath(root)).name
    return Document(source=source, kind="repo", title=title, segments=segments, content_hash=content_hash,
                    meta={"files": len(segments), "lines": sum(s.text.count("\n") + 1 for s in segments)},
                    skipped=skipped)


def _read_file(file: RepoFile) -> tuple[Segment | None, str, str | None]:
    try:
        data = file.absolute.read_bytes()
    except OSError as error:
        return None, "", f"could not be read ({error.strerror})"
    if looks_binary(data):
        return None, "", "binary (NUL or control bytes)"
    try:
        text, _ = decode_text(data, file.relative)
    except IngestError as error:
        return None, "", error.problem
    text = text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")
    if not text.strip():
        return None, "", "empty"
    segment = Segment(anchor=f"{file.relative}:1", text=text, path=file.relative, line_start=1,
                      numbered=True)
    return segment, hashlib.sha256(data).hexdigest(), None


def _empty_hint(skipped: list[Skipped]) -> str:
    if not skipped:
        return "the folder is empty: pass a folder with source or text files"
    reasons = sorted({item.reason for item in skipped})[:3]
    return f"everything was skipped ({'; '.join(reasons)}): pass a different folder"
