"""Where salachat keeps its data. One root, overridable: --data-dir, then SALACHAT_HOME, then platformdirs."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

_override: Path | None = None


def set_data_dir(path: str | os.PathLike | None) -> None:
    """Called by the CLI for --data-dir; wins over the environment."""
    global _override
    _override = Path(path).expanduser().resolve() if path else None


def data_dir() -> Path:
    if _override is not None:
        root = _override
    elif os.environ.get("SALACHAT_HOME"):
        root = Path(os.environ["SALACHAT_HOME"]).expanduser().resolve()
    else:
        root = Path(platformdirs.user_data_dir("salachat", appauthor=False))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _sub(name: str) -> Path:
    path = data_dir() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    return _sub("models")


def sessions_dir() -> Path:
    return _sub("sessions")


def cache_dir() -> Path:
    """Derived data that can be rebuilt (ingest cache); still under the one root so nothing leaks elsewhere."""
    return _sub("cache")
