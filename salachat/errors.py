"""Exit codes that scripts can rely on, and the one-line error the CLI prints for each failure kind."""

from __future__ import annotations

OK = 0
FAILED = 1  # the model or the engine failed at run time
USAGE = 2  # bad flags or arguments (Typer/Click's own code)
BAD_INPUT = 3  # a document could not be read: missing, unsupported, empty, encrypted …
NO_MODEL = 4  # the model is not installed or cannot be loaded
NO_SESSION = 5  # the session does not exist or cannot be loaded
INTERRUPTED = 130  # Ctrl-C


class UserError(Exception):
    """An error the user can act on: printed as one line, no traceback, with its exit code."""

    def __init__(self, message: str, code: int = FAILED):
        super().__init__(message)
        self.code = code
