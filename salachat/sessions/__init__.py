"""Saved conversations: read a book once, ask about it days later (see store.py for the folder layout).

The catalogue (list, remove, names) and the manifest load without torch; saving and loading engine state
(store, checkpoint) import it on first use, so `salachat sessions list` starts quickly.
"""

from salachat.sessions.catalog import (
    abandoned_before_first_save,
    list_sessions,
    remove_session,
    rename_session,
    session_folder,
)
from salachat.sessions.manifest import SessionError, check_name, read_manifest

_LAZY = {"Checkpointer": "checkpoint", "SessionSaveError": "store", "SessionWriter": "store",
         "load_conversation": "store"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"salachat.sessions.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'salachat.sessions' has no attribute {name!r}")


__all__ = [
    "Checkpointer", "SessionError", "SessionSaveError", "SessionWriter", "abandoned_before_first_save",
    "check_name", "list_sessions", "load_conversation", "read_manifest", "remove_session", "rename_session",
    "session_folder",
]
