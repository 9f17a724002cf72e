"""The chat window's widgets: messages, the reading bar, citations, the side panel."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Label, Markdown, ProgressBar, Static

from salachat.chat import Context


class Answer(Markdown):
    """One message of the log (class "question" or "answer"); answers grow through `Markdown.get_stream`."""


class ReadingBar(Horizontal):
    """Shown while documents are read: tokens read, tokens/s and time left."""

    def compose(self) -> ComposeResult:
        yield ProgressBar(id="read-bar", show_eta=False)
        yield Label("", id="read-label")

    def on_mount(self) -> None:
        self.display = False

    def show(self, done: int, total: int, elapsed: float) -> None:
        self.display = True
        self.query_one(ProgressBar).update(total=total, progress=done)
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (total - done) / rate if rate > 0 else 0.0
        self.query_one(Label).update(
            f"read {done:,} / {total:,} tokens · {rate:,.0f} tok/s · {left:,.0f} s left  (Esc stops)")

    def hide(self) -> None:
        self.display = False


class Citations(Horizontal):
    """The anchors the last answer cites, one button each; pressing one opens its passage."""

    def show(self, passages: list) -> None:
        self.remove_children()
        self.mount_all(Button(Text(f"[{p.anchor}]"), id=f"cite-{i}", compact=True) for i, p in enumerate(passages))


class SidePanel(Vertical):
    """The conversation's documents, the context gauge and a one-line status."""

    def compose(self) -> ComposeResult:
        yield Label("[b]Documents[/b]")
        yield Static("none", id="docs")
        yield Label("[b]Context[/b]")
        yield ProgressBar(id="gauge", show_eta=False, show_percentage=False)
        yield Static("", id="context")
        yield Static("", id="status")

    def show_documents(self, lines: list[str], tokens: int) -> None:
        text = "\n".join(lines) if lines else "none"
        self.query_one("#docs", Static).update(Text(text + (f"\nin all {tokens:,} tokens" if tokens else "")))

    def show_context(self, context: Context) -> None:
        limit = context.limit
        self.query_one("#gauge", ProgressBar).update(total=limit or max(context.tokens, 1), progress=context.tokens)
        mode = {"extended": ", long-context extension", "native": ""}.get(context.long_context, "")
        reading = f"\n{context.pending_tokens:,} to read" if context.pending_tokens else ""
        self.query_one("#context", Static).update(Text(
            f"{context.tokens:,} tokens" + (f" of {limit:,}" if limit else "") + reading
            + f"\nstate {context.state_bytes / 2**20:,.1f} MiB ({context.device}{mode})"))

    def set_status(self, text: str | Text) -> None:
        """Plain strings are the window's own words; user and document text comes as Text."""
        self.query_one("#status", Static).update(Text(text) if isinstance(text, str) else text)
