"""Saved conversations: read a book once, ask about it days later (see store.py for the folder layout and
the interface with the conversation it saves).

The catalogue (list, remove, rename, names, locks) and the manifest load without torch; saving and loading
engine state (store, checkpoint, lazy) import it on first use, so `salachat sessions list` starts quickly.
Every failure is a SessionError (SessionBusy: another salachat has it open; SessionSaveError: a save failed
and the previous one is kept) whose text is one line for the user.
"""

from salachat.sessions.catalog import (
    abandoned_before_first_save,
    list_sessions,
    remove_session,
    rename_session,
    session_bytes,
    session_folder,
    sessions_root,
)
from salachat.sessions.manifest import (
    SessionBusy,
    SessionError,
    SessionSaveError,
    check_name,
    check_session_name,
    read_manifest,
)

_LAZY = {"Checkpointer": "checkpoint", "SessionWriter": "store", "load_conversation": "store",
         "load_session": "store", "saved_model": "store", "ConversationState": "store"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"salachat.sessions.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'salachat.sessions' has no attribute {name!r}")


__all__ = [
    "Checkpointer", "ConversationState", "SessionBusy", "SessionError", "SessionSaveError", "SessionWriter",
    "abandoned_before_first_save", "check_name", "check_session_name", "list_sessions", "load_conversation",
    "load_session", "read_manifest", "remove_session", "rename_session", "saved_model", "session_bytes",
    "session_folder", "sessions_root",
]
