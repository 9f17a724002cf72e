"""The sessions folder as a catalogue: names, locks, listing, renaming, removal. No torch here, so `salachat sessions` is quick."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from salachat.sessions.manifest import MANIFEST, SessionError, check_name, only_our_files, read_manifest

LOCK = "lock"
_HELD_LOCKS: dict[str, object] = {}  # session folder (resolved) → the open, locked file


def lock(folder: Path):
    """An exclusive lock, per process: two salachats saving one session would overwrite each other's segment
    files. Writers of one process share it (they save in turn); the OS drops it when the process ends,
    however it ends."""
    key = str(folder.resolve())
    if key in _HELD_LOCKS:
        return _HELD_LOCKS[key]
    handle = open(folder / LOCK, "a+")  # noqa: SIM115 (held open for the life of the process)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SessionError(f"session {folder.name!r} is open in another salachat: close that one first") from None
    _HELD_LOCKS[key] = handle
    return handle


def session_folder(root: Path, name: str) -> Path:
    return root / check_name(name)


def abandoned_before_first_save(folder: Path) -> bool:
    """A folder whose first save was interrupted: only our files, no manifest. Safe to start over in."""
    return folder.is_dir() and not (folder / MANIFEST).exists() and only_our_files(folder)


def list_sessions(root: Path) -> list[tuple[str, dict | None, str | None]]:
    """(name, manifest or None, error or None) for every folder under root, newest first."""
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        try:
            found.append((folder.name, read_manifest(folder), None))
        except SessionError as e:
            found.append((folder.name, None, str(e)))
    found.sort(key=lambda item: (item[1] or {}).get("updated", ""), reverse=True)
    return found


def remove_session(folder: Path) -> None:
    if not folder.is_dir():
        raise SessionError(f"no session named {folder.name!r}: `salachat sessions list` shows the saved ones")
    if not only_our_files(folder):
        raise SessionError(f"{folder} holds files salachat did not write: remove it by hand if you mean to")
    for path in folder.iterdir():
        path.unlink()
    os.rmdir(folder)


def rename_session(root: Path, old: str, new: str) -> Path:
    """Rename a saved session (its folder: the manifest does not hold its name). One clear error per problem."""
    source, target = session_folder(root, old), session_folder(root, new)
    if not source.is_dir():
        raise SessionError(f"no session named {old!r}: `salachat sessions list` shows the saved ones")
    if target.exists():
        raise SessionError(f"a session named {new!r} exists already: pick another name")
    key = str(source.resolve())
    os.rename(source, target)
    held = _HELD_LOCKS.pop(key, None)
    if held is not None:  # a lock this process holds moved with the folder: file it under the new path
        _HELD_LOCKS[str(target.resolve())] = held
    return target
