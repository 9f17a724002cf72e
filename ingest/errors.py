"""The single exception users see from ingestion; its message is one line saying what to do next."""

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
