"""Exit codes that scripts can rely on, and the one table from library exceptions to them.

Every face uses `classify`: the CLI prints its message as one line and exits with its code, the chat window
shows the line in its status, the server maps the code to an HTTP error. The table names exception classes
by module and name and only looks at modules already imported (an exception cannot be of a class whose
module was never imported), so classifying an error never imports torch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

OK = 0
FAILED = 1  # the model or the engine failed at run time
USAGE = 2  # bad flags or arguments
BAD_INPUT = 3  # a document could not be read: missing, unsupported, empty, encrypted, too long …
NO_MODEL = 4  # the model is not installed or cannot be loaded
NO_SESSION = 5  # the session does not exist or cannot be loaded
INTERRUPTED = 130  # Ctrl-C

NAMES = {OK: "ok", FAILED: "failed", USAGE: "usage", BAD_INPUT: "bad_input", NO_MODEL: "no_model",
         NO_SESSION: "no_session", INTERRUPTED: "interrupted"}


class UserError(Exception):
    """An error the user can act on: printed as one line, no traceback, with its exit code."""

    def __init__(self, message: str, code: int = FAILED):
        super().__init__(message)
        self.code = code


class UsageError(UserError):
    """Bad flags, arguments or configuration (exit 2)."""

    def __init__(self, message: str):
        super().__init__(message, USAGE)


class Interrupted(UserError):
    """Ctrl-C, with what was kept and how to continue (exit 130)."""

    def __init__(self, message: str = "stopped."):
        super().__init__(message, INTERRUPTED)


# (module, class name, exit code). Order matters: a subclass before its base.
TABLE: list[tuple[str, str, int]] = [
    ("salachat.sessions.manifest", "SessionSaveError", FAILED),  # a full disk, not a bad session
    ("salachat.sessions.store", "SessionSaveError", FAILED),
    ("salachat.sessions.manifest", "SessionError", NO_SESSION),
    ("salachat.conversation", "ContextTooLong", BAD_INPUT),
    ("salachat.ingest.errors", "IngestError", BAD_INPUT),
    ("salachat.models", "ModelNotInstalled", NO_MODEL),
    ("salachat.engine.loader", "ModelLoadError", NO_MODEL),
    ("salachat.engine.tokenizer", "TokenizerError", NO_MODEL),
    ("salachat.engine.gguf_file", "GGUFError", NO_MODEL),
    ("salachat.engine.hf", "CheckpointError", NO_MODEL),
    ("salachat.engine.generate", "Cancelled", INTERRUPTED),
]


@dataclass(frozen=True)
class Failure:
    code: int
    message: str
    expected: bool  # False: a bug or an unforeseen condition (the traceback is worth showing with SALACHAT_DEBUG)

    @property
    def kind(self) -> str:
        return NAMES.get(self.code, "failed")

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "code": self.code, "kind": self.kind}}


def _click_failure(error: BaseException) -> Failure | None:
    """Click's and Typer's usage errors, recognised by shape: Typer 0.29 bundles its own copy of click
    (typer._click), whose classes are not click's, and a later release may change again."""
    names = {cls.__name__ for cls in type(error).__mro__}
    if "Abort" in names:
        return Failure(INTERRUPTED, "stopped.", True)
    if "ClickException" in names or "UsageError" in names:
        code = getattr(error, "exit_code", USAGE)
        message = error.format_message() if hasattr(error, "format_message") else str(error)
        return Failure(code if isinstance(code, int) and code else USAGE, message or "bad usage", True)
    return None


def classify(error: BaseException) -> Failure:
    """The exit code and one-line message for any exception."""
    if isinstance(error, UserError):
        return Failure(error.code, str(error), True)
    if isinstance(error, KeyboardInterrupt):
        return Failure(INTERRUPTED, str(error) or "stopped.", True)
    for module_name, class_name, code in TABLE:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type) and isinstance(error, cls):
            return Failure(code, one_line(str(error)) or class_name, True)
    click = _click_failure(error)
    if click is not None:
        return click
    if isinstance(error, MemoryError):
        return Failure(FAILED, "out of memory: try a smaller document, --quant nf4, or --device cpu", True)
    if isinstance(error, OSError) and error.filename is not None:
        return Failure(FAILED, f"{error.filename}: {error.strerror or error}", True)
    text = one_line(str(error))
    return Failure(FAILED, f"{type(error).__name__}: {text}" if text else type(error).__name__, False)


def one_line(text: str) -> str:
    return " ".join(text.split())


def debug() -> bool:
    """SALACHAT_DEBUG=1 shows the traceback of unexpected errors."""
    return os.environ.get("SALACHAT_DEBUG", "") not in ("", "0")
