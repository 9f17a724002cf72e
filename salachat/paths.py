"""Where salachat keeps its data. One root: --data-dir, then SALACHAT_HOME, then the config file's data_dir,
then the platform's data folder (platformdirs). Folders are created private (0700): sessions hold the
documents' whole text."""

from __future__ import annotations

import os
from pathlib import Path

from salachat import errors

_override: Path | None = None


def set_data_dir(path: str | os.PathLike | None) -> None:
    """Called by the CLI for --data-dir; wins over the environment and the config file."""
    global _override
    _override = Path(path).expanduser().resolve() if path else None


def _root() -> tuple[Path, str]:
    if _override is not None:
        return _override, "--data-dir"
    if os.environ.get("SALACHAT_HOME"):
        return Path(os.environ["SALACHAT_HOME"]).expanduser().resolve(), "SALACHAT_HOME"
    from salachat import config

    configured = config.current().data_dir
    if configured:
        return Path(configured).expanduser().resolve(), f"data_dir in {config.current().path}"
    import platformdirs

    return Path(platformdirs.user_data_dir("salachat", appauthor=False)), "the platform's data folder"


def _make(path: Path, origin: str) -> Path:
    if path.exists() and not path.is_dir():
        raise errors.UsageError(f"data folder {path} (from {origin}) is not a folder: point it at a folder")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise errors.UserError(f"data folder {path} (from {origin}) cannot be created ({e.strerror or e})",
                               errors.FAILED) from None
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise errors.UserError(f"data folder {path} (from {origin}) is not writable: fix its permissions or "
                               "pass --data-dir", errors.FAILED)
    return path


def data_dir() -> Path:
    root, origin = _root()
    return _make(root, origin)


def _sub(name: str) -> Path:
    root, origin = _root()
    _make(root, origin)
    return _make(root / name, origin)


def models_dir() -> Path:
    return _sub("models")


def sessions_dir() -> Path:
    return _sub("sessions")


def cache_dir() -> Path:
    """Derived data that can be rebuilt (ingest cache); still under the one root so nothing leaks elsewhere."""
    return _sub("cache")
