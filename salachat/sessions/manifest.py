"""The manifest: one JSON file per session, the commit point of every save.

It names every file of the session with its checksum (atomic.py: a piece tree of XXH3-128; older sessions
hold a piece tree of sha256 or a plain sha256, and the field is called "sha256" whatever its prefix says it
holds), so a save is visible only once its manifest is renamed into place, and a load can prove that each
byte it uses is the byte that was saved. The manifest carries its own checksum too: a flipped byte anywhere
is caught, never turned into a silently wrong answer. A manifest that passes its checksum is still checked
field by field (schema.py) before anything reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from salachat.sessions import schema
from salachat.sessions.atomic import (
    DIR_MODE,
    FILE_MODE,
    PIECE,
    piece_digests,
    sha256_file,
    tree_of,
    write_atomic,
)

FORMAT = "salachat-session"
VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 256 << 20  # turns and all: a real one is a few MB even after a thousand questions
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
OWN_FILE = re.compile(r"(lock|manifest\.json|text-[0-9a-f]{16}\.json|(kv|state)-[0-9]{6}\.safetensors)(\.tmp)?\Z")

__all__ = ["DIR_MODE", "FILE_MODE", "SessionBusy", "SessionError", "SessionSaveError", "check_session_name"]


class SessionError(Exception):
    """One line for the user: what is wrong with the session, and what to do next."""


class SessionBusy(SessionError):
    """Another salachat process has the session open."""


class SessionSaveError(SessionError):
    """A save failed (full disk, permissions); the session still holds its previous save."""


def check_session_name(name: str) -> str:
    """`name` if it can name a session folder, else SessionError: 1 to 64 letters, digits, '.', '_' or '-',
    starting with a letter or digit (so no hidden folder, no '..', no path separator, no control character,
    no trailing newline)."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        shown = repr(name) if len(str(name)) <= 80 else repr(str(name)[:80]) + "…"
        raise SessionError(f"session name {shown}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a "
                           "letter or digit")
    return name


check_name = check_session_name  # the older name, still imported by the faces


def damaged(name: str, problem: str) -> SessionError:
    return SessionError(f"session {name!r} is damaged ({problem}): remove it with `salachat sessions rm {name}` "
                        "and read the documents again")


def unreadable(folder: Path, error: OSError) -> SessionError:
    return SessionError(f"cannot read session {folder.name!r} ({error.strerror or error}): check the permissions "
                        f"of {folder}")


def only_our_files(folder: Path) -> bool:
    """Whether everything in `folder` is a file a session save writes (so deleting it loses nothing else).
    A symbolic link is never ours, whatever its name."""
    return all(stat.S_ISREG(p.lstat().st_mode) and OWN_FILE.match(p.name) for p in folder.iterdir())


def session_file(folder: Path, filename: str) -> Path:
    """The path of a file the manifest names, once it is sure to stay inside `folder`: a plain name of a kind
    the store writes (schema.DATA_FILE), and a regular file, not a link to somewhere else."""
    if not schema.DATA_FILE.match(filename):
        raise damaged(folder.name, f"the manifest names {filename!r}, not a session file")
    path = folder / filename
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        raise damaged(folder.name, f"{filename} is missing") from None
    except OSError as e:
        raise unreadable(folder, e) from None
    if not stat.S_ISREG(mode):
        raise damaged(folder.name, f"{filename} is a link or a folder, not a file the session wrote")
    return path


def _checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def write_manifest(folder: Path, body: dict) -> None:
    body = {k: v for k, v in body.items() if k != "checksum"}
    text = json.dumps({**body, "checksum": _checksum(body)}, ensure_ascii=False, indent=1)
    write_atomic(folder / MANIFEST, [text.encode()])


def read_manifest(folder: Path) -> dict:
    """The verified manifest of the session in `folder` (its own checksum, format and fields, not yet its
    files), with the fields older versions lacked filled in. Any problem is one SessionError."""
    name = folder.name
    path = folder / MANIFEST
    try:
        if not folder.is_dir():
            raise SessionError(f"no session named {name!r}: `salachat sessions list` shows the saved ones")
        if not path.is_file() or path.is_symlink():
            raise SessionError(f"{folder} is not a salachat session (no {MANIFEST}): move that folder away, or "
                               "pick another session name")
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise damaged(name, f"its manifest has {size:,} bytes")
        raw = path.read_bytes()
    except OSError as e:
        raise unreadable(folder, e) from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise damaged(name, "unreadable manifest") from None
    if not isinstance(manifest, dict):
        raise damaged(name, "unreadable manifest")
    if manifest.get("format") != FORMAT:
        raise SessionError(f"{folder} is not a salachat session")
    version = manifest.get("version")
    if version != VERSION or type(version) is not int:
        shown = repr(version) if len(repr(version)) <= 20 else repr(version)[:20] + "…"
        raise SessionError(f"session {name!r} was saved in format version {shown}, this salachat reads version "
                           f"{VERSION}: use the salachat that saved it, or read the documents again")
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    try:
        intact = manifest.get("checksum") == _checksum(body)
    except (ValueError, RecursionError):  # NaN, lone surrogates, nesting too deep to serialise
        intact = False
    if not intact:
        raise damaged(name, "manifest checksum mismatch")
    try:
        return schema.check(manifest)
    except schema.ManifestOutdated as e:
        raise SessionError(f"session {name!r} was saved by an older salachat and cannot be resumed ({e}): "
                           f"read the documents again (`salachat sessions rm {name}` removes it)") from None
    except schema.ManifestInvalid as e:
        raise damaged(name, f"manifest: {e}") from None


def _problem(folder: Path, filename: str, info: dict, digests: list[bytes] | None) -> str | None:
    path = folder / filename
    try:
        mode = path.lstat().st_mode
        if not stat.S_ISREG(mode):
            return f"{filename} is a link or a folder, not a file the session wrote"
        size = path.stat().st_size
        if size != info["bytes"]:
            return f"{filename} has {size} bytes, expected {info['bytes']} (truncated?)"
        tree = tree_of(info["sha256"])
        if tree is not None:
            if digests is None:  # hashing failed: open it to name why
                with open(path, "rb"):
                    return f"{filename} cannot be read"
            actual = tree.checksum(digests)
        else:
            actual = sha256_file(path)[0]
    except FileNotFoundError:
        return f"{filename} is missing"
    except OSError as e:
        return f"{filename} cannot be read: {e.strerror or e}"
    if actual != info["sha256"]:
        return f"{filename} fails its checksum"
    return None


def verify_files(folder: Path, manifest: dict, only: set[str] | None = None) -> None:
    """Every file the manifest names (or those in `only`) is present, of the right size and checksum. The
    64 MiB pieces of all files are hashed in parallel (hashlib and xxhash release the GIL): with sha256,
    checksums, not the disk, bound a verified load (measured: 0.73 GB/s for a 1M-token session when each file
    hashed on one core)."""
    files = sorted((n, i) for n, i in manifest["files"].items() if only is None or n in only)
    tasks = []  # (file index, piece ids): a few pieces a task, so that big files spread over the workers
    for i, (name, info) in enumerate(files):
        path = folder / name
        try:
            regular = stat.S_ISREG(path.lstat().st_mode) and path.stat().st_size == info["bytes"]
        except OSError:
            regular = False  # reported by _problem below
        if tree_of(info["sha256"]) is not None and regular:
            count = max(1, -(-info["bytes"] // PIECE))
            tasks += [(i, list(range(b, min(b + 4, count)))) for b in range(0, count, 4)]

    def hash_task(task):
        try:
            name, info = files[task[0]]
            return piece_digests(folder / name, task[1], tree_of(info["sha256"]))
        except OSError:
            return None  # reported by _problem, which reads the file again

    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        hashed = list(pool.map(hash_task, tasks))
        digests: dict[int, list[bytes] | None] = {}
        for (i, _), part in zip(tasks, hashed):
            if part is None or digests.get(i, []) is None:
                digests[i] = None
            else:
                digests.setdefault(i, []).extend(part)
        problems = list(pool.map(lambda i: _problem(folder, *files[i], digests.get(i)), range(len(files))))
    problem = next((p for p in problems if p), None)
    if problem:
        raise damaged(folder.name, problem)
