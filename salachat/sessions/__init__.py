"""Saved conversations: read a book once, ask about it days later (see store.py for the folder layout)."""

from salachat.sessions.checkpoint import Checkpointer
from salachat.sessions.manifest import SessionError, check_name, read_manifest
from salachat.sessions.store import (
    SessionSaveError,
    SessionWriter,
    list_sessions,
    load_conversation,
    remove_session,
    session_folder,
)

__all__ = [
    "Checkpointer", "SessionError", "SessionSaveError", "SessionWriter", "check_name", "list_sessions",
    "load_conversation", "read_manifest", "remove_session", "session_folder",
]
