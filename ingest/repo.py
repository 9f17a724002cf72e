"""A folder or git checkout as one Document: .gitignore files at every level are honoured, vendored,
generated, binary and oversized files are skipped (and listed, with the reason), symlinks never lead
out of the folder. README and docs come first, then the rest by path; each file is one numbered
Segment anchored "path:1"."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pathspec

from .document import Document, Segment, Skipped
from .errors import Empty, IngestError, TooLarge
from .stream import Budget, estimate_tokens, has_binary
from .textio import decode_text, looks_binary

Progress = Callable[[str, int, int], None]
MAX_FILE_BYTES = 1_000_000
# Entries a walk looks at before refusing: the Linux kernel has ~80K files, a mistaken `salachat ingest ~`
# or `/` millions, which would take minutes to list before anything else could be said.
MAX_WALK_ENTRIES = 250_000
CREDENTIAL = "looks like a credential"
SKIPPED_DIRS = {
    ".git": "version-control data", ".hg": "version-control data", ".svn": "version-control data",
    "node_modules": "vendored dependencies", "vendor": "vendored dependencies",
    "bower_components": "vendored dependencies", "site-packages": "vendored dependencies",
    ".venv": "virtual environment", "venv": "virtual environment", ".tox": "virtual environment",
    ".nox": "virtual environment", "__pycache__": "generated", "dist": "generated", "build": "generated",
    "target": "generated", ".eggs": "generated", ".mypy_cache": "generated", ".pytest_cache": "generated",
    ".ruff_cache": "generated", ".hypothesis": "generated", ".next": "generated", ".cache": "generated",
    ".gradle": "generated", ".idea": "editor settings", ".vscode": "editor settings",
    ".ssh": CREDENTIAL, ".gnupg": CREDENTIAL, ".aws": CREDENTIAL, ".password-store": CREDENTIAL,
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
GENERATED_FILES = {"go.sum", "npm-shrinkwrap.json", "pnpm-lock.yaml", "bun.lockb"}
# Anything that may hold a password, a token or a private key is never read, wherever it sits.
SECRET_FILES = {
    ".env", ".envrc", ".netrc", "_netrc", ".pgpass", ".pypirc", ".npmrc", ".yarnrc", ".yarnrc.yml",
    ".git-credentials", ".gitcredentials", ".my.cnf", ".boto", ".s3cfg", ".dockercfg", ".htpasswd",
    ".vault-token", ".terraformrc", "credentials", "credentials.json", "client_secret.json", "kubeconfig",
    "secrets.yml", "secrets.yaml", "id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", "id_ecdsa_sk", "id_ed25519_sk",
    "identity", "terraform.tfstate", "terraform.tfstate.backup",
}
SECRET_SUFFIXES = {".pem", ".key", ".p12", ".pfx", ".jks", ".keystore", ".ppk", ".kdbx", ".tfstate", ".tfvars",
                   ".ovpn", ".age"}
SECRET_PATHS = (".docker/config.json", ".kube/config", ".config/gcloud/", ".config/gh/hosts.yml")
# Text that is a credential wherever it sits: private keys and the token formats of the big services. Each
# pattern runs only where a plain substring test finds its fixed part (one regex over all of them took
# 0.45 s per MB of source).
_SECRET_TEXT = [
    # A key's header followed by its body (or an encrypted key's Proc-Type line), on real lines or in a
    # string literal with "\n" escapes; the bare header is a constant in code that parses keys.
    (("PRIVATE KEY",), re.compile(r"-----BEGIN [A-Z0-9 ]{0,20}PRIVATE KEY(?: BLOCK)?-----(?:\s|\\[nr])*"
                                  r"(?:[A-Za-z0-9+/=]{40}|Proc-Type:)")),
    (("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
     re.compile(r"\baws_secret_access_key\s*[=:]\s*\S", re.IGNORECASE)),
    (("ghp_", "gho_", "ghu_", "ghs_", "ghr_"), re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b")),
    (("github_pat_",), re.compile(r"\bgithub_pat_[A-Za-z0-9_]{60,}")),
    (("xox",), re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}")),
    (("sk-",), re.compile(r"\bsk-(?:proj-)?[A-Za-z0-9_-]{32,}")),
    (("AKIA",), re.compile(r"\bAKIA[0-9A-Z]{16}\b")),
]
# Markup that draws a picture: thousands of tokens of coordinates and nothing to read (in one small real
# repository, SVG logos were 38 % of the tokens).
IMAGE_MARKUP_SUFFIXES = {".svg", ".svgz", ".eps", ".ai", ".drawio", ".dia", ".excalidraw"}
LOCK_FILES = {"package-lock.json", "yarn.lock", "poetry.lock", "Cargo.lock", "uv.lock", "Pipfile.lock",
              "composer.lock", "Gemfile.lock", "flake.lock", "pdm.lock", "mix.lock", "Podfile.lock",
              "pubspec.lock", "packages.lock.json", "gradle.lockfile", "Package.resolved", "deno.lock"}
BUNDLE_ENDINGS = (".min.js", ".min.css", "-min.js", ".min.mjs", ".bundle.js", ".chunk.js", ".map")
PROSE_SUFFIXES = {".md", ".markdown", ".rst", ".txt", ".text", ".tex", ".adoc", ""}
# Minified or generated: code whose lines average over 200 characters with one over 1,000 (no one writes
# that by hand); prose paragraphs may be single long lines, so for prose only a line over 20,000 counts.
LONG_LINE, LONG_MEAN, LONG_PROSE_LINE = 1_000, 200, 20_000
_DOC_DIRS = {"doc", "docs", "documentation"}


@dataclass(frozen=True)
class RepoFile:
    relative: str  # posix path inside the repository: what anchors and headers show
    absolute: Path
    size: int = 0


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


def walk_named(root: Path, source: str, max_file_bytes: int = MAX_FILE_BYTES) -> tuple[list[RepoFile],
                                                                                   list[Skipped]]:
    """walk_repo, with a refusal naming the folder as the user wrote it."""
    try:
        return walk_repo(root, max_file_bytes)
    except TooLarge as error:
        raise TooLarge(source, error.problem, hint=error.hint) from None


def _walk(folder: Path, root_real: Path, relative: str, ignores: list[_Ignore], files: list[RepoFile],
          skipped: list[Skipped], max_file_bytes: int) -> None:
    ignores = ignores + _read_ignore(folder / ".gitignore", relative)
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as error:
        skipped.append(Skipped(relative or ".", f"folder could not be listed ({error.strerror})"))
        return
    if len(files) + len(skipped) + len(entries) > MAX_WALK_ENTRIES:
        raise TooLarge(str(root_real), f"holds more than {MAX_WALK_ENTRIES:,} files and folders",
                       hint="pass the subfolder that matters, or add a .gitignore")
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
        reason, size = _file_problem(entry, path, max_file_bytes)
        if reason:
            skipped.append(Skipped(path, reason))
        else:
            files.append(RepoFile(path, Path(entry.path), size))


def _read_ignore(path: Path, base: str) -> list[_Ignore]:
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return []  # a FIFO named .gitignore must not block the walk
        with path.open("rb") as handle:  # the first megabyte: no real .gitignore is longer
            lines = handle.read(MAX_FILE_BYTES).decode("utf-8", errors="replace").splitlines()
    except OSError:
        return []
    if not lines:
        return []
    try:
        spec = _spec(lines)
    except (ValueError, re.error):  # pathspec's pattern errors are ValueErrors
        # Git skips a pattern it cannot read ("!" alone, "[z-a]"); so do we, keeping the others.
        spec = _spec([line for line in lines if _valid_pattern(line)])
    return [_Ignore(base, spec)]


def _spec(lines: list[str]) -> pathspec.GitIgnoreSpec:
    # re warns (FutureWarning: "Possible nested set") about patterns like "[[a]": never on the terminal.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = pathspec.GitIgnoreSpec.from_lines(lines)
        spec.check_file("x")  # some patterns fail only when first matched
    return spec


def _valid_pattern(line: str) -> bool:
    try:
        _spec([line])
    except (ValueError, re.error):
        return False
    return True


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


def name_problem(relative: str) -> str | None:
    """Why a file is not read, judged by its path alone: credentials, pictures, lock files, bundles."""
    name = relative.rsplit("/", 1)[-1]
    suffix = PurePosixPath(name).suffix.lower()
    if (name in SECRET_FILES or suffix in SECRET_SUFFIXES or name.startswith((".env.", "kubeconfig"))
            or (name.startswith("client_secret") and suffix == ".json")
            or any(relative == p or relative.endswith("/" + p) or (p.endswith("/") and p in "/" + relative)
                   for p in SECRET_PATHS)):
        return CREDENTIAL
    if suffix in IMAGE_MARKUP_SUFFIXES:
        return f"image ({suffix} markup, nothing to read)"
    if name in LOCK_FILES or name.endswith((".lock", "-lock.json", "-lock.yaml")):
        return "lock file (generated)"
    if name in GENERATED_FILES:
        return "generated"
    if name.endswith(BUNDLE_ENDINGS):
        return "minified or generated bundle"
    if suffix in BINARY_SUFFIXES:
        return f"binary ({suffix})"
    return None


def _file_problem(entry: os.DirEntry, relative: str, max_file_bytes: int) -> tuple[str | None, int]:
    reason = name_problem(relative)
    if reason:
        return reason, 0
    try:
        info = entry.stat()
    except OSError as error:
        return f"could not be examined ({error.strerror})", 0
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file (a FIFO, socket or device)", 0
    if info.st_size > max_file_bytes:
        return f"larger than the {max_file_bytes:,}-byte limit ({info.st_size:,} bytes)", info.st_size
    if info.st_size == 0:
        return "empty", 0
    return None, info.st_size


def text_problem(relative: str, text: str) -> str | None:
    """Why a decoded file is not read, judged by its content: a credential inside, or minified lines."""
    if any(any(hint in text for hint in hints) and pattern.search(text) for hints, pattern in _SECRET_TEXT):
        return CREDENTIAL + " (it holds a private key or an access token)"
    lines = text.count("\n") + 1
    longest = max(map(len, text.split("\n"))) if len(text) > LONG_LINE else 0
    prose = PurePosixPath(relative).suffix.lower() in PROSE_SUFFIXES
    if longest > LONG_PROSE_LINE or (not prose and longest > LONG_LINE and len(text) / lines > LONG_MEAN):
        return f"minified or generated (a line of {longest:,} characters)"
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
              max_file_bytes: int = MAX_FILE_BYTES, *, budget: Budget | None = None) -> Document:
    files, skipped = walk_named(root, source, max_file_bytes)
    total_bytes = sum(file.size for file in files)
    segments: list[Segment] = []
    digests: list[str] = []
    done_bytes = tokens = 0
    for done, file in enumerate(files, start=1):
        segment, digest, reason = _read_file(file)
        done_bytes += file.size
        if reason:
            skipped.append(Skipped(file.relative, reason))
        else:
            segments.append(segment)
            digests.append(f"{file.relative}\0{digest}\n")
            if budget is not None:
                tokens += estimate_tokens(segment.text)
                budget.check(source, tokens, done_bytes, total_bytes, total_bytes)
        if progress:
            progress(source, done, len(files))
    if not segments:
        raise Empty(source, "has no readable text files", hint=_empty_hint(skipped))
    content_hash = hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()
    title = Path(os.path.realpath(root)).name
    return Document(source=source, kind="repo", title=title, segments=segments, content_hash=content_hash,
                    meta={"files": len(segments), "lines": sum(s.text.count("\n") + 1 for s in segments),
                          "bytes": total_bytes},
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
    if has_binary(text):  # binary after a text-looking start
        return None, "", "binary (NUL or control bytes)"
    reason = text_problem(file.relative, text)
    if reason:
        return None, "", reason
    segment = Segment(anchor=f"{file.relative}:1", text=text, path=file.relative, line_start=1,
                      numbered=True)
    return segment, hashlib.sha256(data).hexdigest(), None


def _empty_hint(skipped: list[Skipped]) -> str:
    if not skipped:
        return "the folder is empty: pass a folder with source or text files"
    reasons = sorted({item.reason for item in skipped})[:3]
    return f"everything was skipped ({'; '.join(reasons)}): pass a different folder"
