"""The exceptions users see from ingestion; each message is one line saying what is wrong and what to do.

Every failure is an IngestError; the subclasses only let a caller tell the kinds apart (a CLI may word a
refusal for length differently from a damaged file) without parsing messages."""

from __future__ import annotations


class IngestError(Exception):
    """A file could not be read. `str(error)` names the file (and page) and the next step."""

    def __init__(self, path: str, problem: str, *, page: int | None = None, hint: str = "") -> None:
        self.path = path
        self.page = page
        self.problem = problem
        self.hint = hint
        where = f"{path}, page {page}" if page is not None else path
        message = f"{where}: {problem}"
        if hint:
            message += f"; {hint}"
        # One line, whatever the underlying library put in its message.
        super().__init__(" ".join(message.split()))


class NotFound(IngestError):
    """The path does not exist, cannot be opened, or fails to read (an I/O error)."""


class PermissionDenied(IngestError):
    """The file or folder exists but may not be read."""


class Unsupported(IngestError):
    """A kind of file salachat does not read (a .docx, a FIFO, a device)."""


class Damaged(IngestError):
    """A PDF, EPUB or gzip file that is broken, truncated or not what its name says."""


class BadEncoding(IngestError):
    """Text that is not valid in the encoding it declares or is detected in."""


class Binary(IngestError):
    """Binary content (NUL or control bytes) where text was expected, anywhere in the file."""


class Empty(IngestError):
    """Nothing to read: zero bytes, only whitespace, or no text layer."""


class Protected(IngestError):
    """Password-protected or DRM-protected content."""


class TooLarge(IngestError):
    """More than the model (or salachat's hard caps) can take. Carries the figures of the refusal."""

    def __init__(self, path: str, problem: str, *, hint: str = "", size_bytes: int | None = None,
                 tokens: int | None = None, limit: int | None = None) -> None:
        super().__init__(path, problem, hint=hint)
        self.size_bytes = size_bytes
        self.tokens = tokens
        self.limit = limit


class Unexpected(IngestError):
    """A reader failed in a way it does not anticipate: a bug to report, still one line."""
