"""The sessions folder as a catalogue: names, locks, listing, renaming, removal. No torch here, so `salachat sessions` is quick."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from salachat.sessions.atomic import FILE_MODE, private_dir
from salachat.sessions.manifest import (
    MANIFEST,
    SessionBusy,
    SessionError,
    check_session_name,
    only_our_files,
    read_manifest,
)

LOCK = "lock"
_HELD_LOCKS: dict[str, object] = {}  # session folder (resolved) → the open, locked file


def _busy(folder: Path) -> SessionBusy:
    return SessionBusy(f"session {folder.name!r} is open in another salachat: close that one first")


def _open_lock(folder: Path):
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    return os.fdopen(fd, "a+")


def lock(folder: Path):
    """An exclusive lock, per process: two salachats saving one session would overwrite each other's segment
    files. Writers of one process share it (they save in turn); the OS drops it when the process ends,
    however it ends."""
    key = str(folder.resolve())
    if key in _HELD_LOCKS:
        return _HELD_LOCKS[key]
    try:
        handle = _open_lock(folder)
    except OSError as e:
        raise SessionError(f"cannot open session {folder.name!r} for writing ({e.strerror or e}): check the "
                           f"permissions of {folder}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise _busy(folder) from None
    _HELD_LOCKS[key] = handle
    return handle


def unlock(folder: Path) -> None:
    """Let go of the lock `lock(folder)` took (every writer of this process on that folder shares it)."""
    handle = _HELD_LOCKS.pop(str(folder.resolve()), None)
    if handle is not None:
        handle.close()


class _Claim:
    """Holds a session's lock for the length of a `with` (rm, rename), unless this process holds it already;
    SessionBusy if another process does. A folder without a lock file was never opened for writing."""

    def __init__(self, folder: Path):
        self.folder, self.handle = folder, None

    def __enter__(self):
        if str(self.folder.resolve()) in _HELD_LOCKS or not (self.folder / LOCK).is_file():
            return self
        try:
            self.handle = open(self.folder / LOCK, "rb")
        except OSError:
            return self  # unreadable: the removal below reports the permission problem
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise _busy(self.folder) from None
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.close()


def sessions_root() -> Path:
    """The data folder's sessions/ folder, created private (0700); SessionError where it cannot be."""
    from salachat import paths

    try:
        root = paths.sessions_dir()
        private_dir(root)
        return root
    except OSError as e:
        where = e.filename or "the data folder"
        hint = ("a file is in the way of the data folder" if e.errno in (errno.EEXIST, errno.ENOTDIR)
                else "check its permissions, or pass another with --data-dir or SALACHAT_HOME")
        raise SessionError(f"cannot use {where} for sessions ({e.strerror or e}): {hint}") from None


def session_folder(root: Path, name: str) -> Path:
    return root / check_session_name(name)


def abandoned_before_first_save(folder: Path) -> bool:
    """A folder whose first save was interrupted: only our files, no manifest. Safe to start over in."""
    try:
        return folder.is_dir() and not (folder / MANIFEST).exists() and only_our_files(folder)
    except OSError:
        return False


def list_sessions(root: Path) -> list[tuple[str, dict | None, str | None]]:
    """(name, manifest or None, error or None) for every folder under root that a session name can name,
    newest first."""
    found = []
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    except OSError as e:
        raise SessionError(f"cannot list the sessions in {root} ({e.strerror or e}): check its permissions") from None
    for folder in folders:
        try:
            check_session_name(folder.name)
        except SessionError:
            continue  # not addressable as a session (a hidden folder, a stray name): not ours to show
        try:
            found.append((folder.name, read_manifest(folder), None))
        except SessionError as e:
            found.append((folder.name, None, str(e)))
    found.sort(key=lambda item: (item[1] or {}).get("updated", ""), reverse=True)
    return found


def session_bytes(folder: Path) -> int:
    """Bytes the session's files take (what removing it frees)."""
    total = 0
    for path in folder.iterdir():
        info = path.lstat()
        if stat.S_ISREG(info.st_mode):
            total += info.st_blocks * 512 if hasattr(info, "st_blocks") else info.st_size
    return total


def remove_session(folder: Path) -> int:
    """Delete a saved session; returns the bytes freed. SessionBusy while another salachat has it open."""
    if not folder.is_dir() or folder.is_symlink():
        raise SessionError(f"no session named {folder.name!r}: `salachat sessions list` shows the saved ones")
    try:
        with _Claim(folder):
            if not only_our_files(folder):
                raise SessionError(f"{folder} holds files salachat did not write: remove it by hand if you mean to")
            freed = session_bytes(folder)
            for path in folder.iterdir():
                if path.name != LOCK:
                    path.unlink()
            (folder / LOCK).unlink(missing_ok=True)  # last: while it is there, a new writer still meets our lock
            os.rmdir(folder)
    except OSError as e:
        raise SessionError(f"could not remove session {folder.name!r} ({e.strerror or e}): check the permissions "
                           f"of {folder}") from None
    _HELD_LOCKS.pop(str(folder.resolve()), None)
    return freed


def rename_session(root: Path, old: str, new: str) -> Path:
    """Rename a saved session (its folder: the manifest does not hold its name). One clear error per problem;
    SessionBusy while another salachat has it open."""
    source, target = session_folder(root, old), session_folder(root, new)
    if not source.is_dir() or source.is_symlink():
        raise SessionError(f"no session named {old!r}: `salachat sessions list` shows the saved ones")
    if target.exists() or target.is_symlink():
        raise SessionError(f"a session named {new!r} exists already: pick another name")
    key = str(source.resolve())
    try:
        with _Claim(source):
            os.rename(source, target)
    except OSError as e:
        raise SessionError(f"could not rename session {old!r} ({e.strerror or e}): check the permissions of "
                           f"{root}") from None
    held = _HELD_LOCKS.pop(key, None)
    if held is not None:  # a lock this process holds moved with the folder: file it under the new path
        _HELD_LOCKS[str(target.resolve())] = held
    return target
