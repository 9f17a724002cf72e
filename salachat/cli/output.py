"""Printing for the commands: answers on stdout, everything else on stderr, all user and document text as
text (rich.text.Text / markup=False), never as markup: a title or a question holding "[/x]" or "[p.12]"
prints as typed."""

import contextlib
import json
import sys

from rich.markup import escape
from rich.text import Text

from salachat import errors
from salachat.console import err, out, reading_progress

__all__ = ["Text", "escape"]


def note(line: str) -> None:
    err.print(Text(line, style="yellow"))


def line(text: str, style: str = "") -> None:
    out.print(Text(text, style=style))


def print_error(failure: errors.Failure, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(failure.to_dict(), ensure_ascii=False), flush=True)
    text = Text("error: ", style="red")
    text.append(failure.message)
    err.print(text)


@contextlib.contextmanager
def progress_bar(enabled: bool = True, label: str = "reading"):
    """A `progress(done, total, seconds)` callback drawing a bar on stderr (nothing when disabled)."""
    if not enabled:
        yield None
        return
    with reading_progress(label) as bar:
        task = bar.add_task("read", total=1, rate="")

        def progress(done: int, total: int, elapsed: float) -> None:
            rate = f"{done / elapsed:,.0f} tok/s" if elapsed > 0 else ""
            bar.update(task, completed=done, total=total, rate=rate)

        yield progress


def stream(pieces, as_json: bool) -> str:
    """Print the answer's pieces as they come (not with --json); the whole answer."""
    got = []
    for piece in pieces:
        got.append(piece)
        if not as_json:
            out.file.write(piece)
            out.file.flush()
    if not as_json:
        out.file.write("\n")
        out.file.flush()
    return "".join(got)


def cited(passages) -> None:
    for passage in passages:
        excerpt = " ".join(passage.text.split())
        excerpt = excerpt[:240] + ("…" if len(excerpt) > 240 else "")
        err.print(Text(f"── {passage.source}\n{excerpt}", style="dim"))


def answer_json(chat, answer: str, stats, *, read_seconds: float, load_seconds: float | None = None) -> None:
    """The one --json schema of ask and resume (docs/architecture.md)."""
    context = chat.context()
    print(json.dumps({
        "answer": answer,
        "session": chat.session_name,
        "model": chat.model_id,
        "long_context": context.long_context,
        "documents": chat.manifest_documents,
        "document_tokens": context.document_tokens,
        "context_tokens": context.tokens,
        "context_limit": context.limit,
        "read_seconds": round(read_seconds, 4),
        "session_load_seconds": None if load_seconds is None else round(load_seconds, 4),
        "notes": chat.notes,
        **stats.to_dict(),
    }, ensure_ascii=False), flush=True)


def stdout_is_broken(error: BaseException) -> bool:
    return isinstance(error, BrokenPipeError) or (isinstance(error, OSError) and error.errno == 32)


def flush_quietly() -> None:
    with contextlib.suppress(Exception):
        sys.stdout.flush()
