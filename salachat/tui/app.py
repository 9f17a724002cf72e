"""The chat window: a conversation with documents, the model running in thread workers.

The event loop only draws: loading the model, reading and generating run in thread workers (workers.py)
that hand their progress back with `call_from_thread`. Stopping (Escape) sets a flag the engine polls
between reading chunks and between tokens, so a stop is prompt and leaves the cache consistent (and, with
a session, saved).
"""

from __future__ import annotations

import time
from typing import ClassVar

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Footer, Header, Input, Markdown

from salachat.tui.screens import PassageScreen, SessionsScreen
from salachat.tui.widgets import Answer, Citations, ReadingBar, SidePanel
from salachat.tui.workers import Chat, Options

__all__ = ["Answer", "Options", "SalaChat"]

STREAM_FPS = 20  # answer updates a second while it streams


class SalaChat(App[int]):
    TITLE = "salachat"
    CSS_PATH = "styles.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+o", "sessions", "Sessions"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, options: Options, loaded=None, clock=time.perf_counter):
        super().__init__()
        self.chat = Chat(options, loaded)
        self.clock = clock
        self.stop_requested = False
        self.busy = False
        self.history: list[str] = []
        self.history_at = 0
        self.passages: list = []

    @property
    def conversation(self):
        return self.chat.conversation

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="main"):
                yield VerticalScroll(id="log")
                yield ReadingBar(id="reading")
                yield Citations(id="citations")
                yield Input(placeholder="Ask about the documents …  (Enter to send, ↑/↓ history)", id="question")
            yield SidePanel(id="side")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#log", VerticalScroll).anchor()  # follow the newest text
        self.query_one("#question", Input).focus()
        self.start()

    def set_status(self, text: str) -> None:
        self.query_one(SidePanel).set_status(text)

    def add_message(self, who: str, text: str) -> Answer:
        widget = Answer(text, classes=who)
        self.query_one("#log", VerticalScroll).mount(widget)
        return widget

    def show_reading(self, done: int, total: int, elapsed: float) -> None:
        self.query_one(ReadingBar).show(done, total, elapsed)

    def hide_reading(self) -> None:
        self.query_one(ReadingBar).hide()
        self.update_side()

    def update_side(self) -> None:
        if self.conversation is None:
            return
        side = self.query_one(SidePanel)
        side.show_documents(self.chat.document_lines, self.conversation.document_tokens)
        side.show_context(self.chat.context())
        self.sub_title = self.chat.session_name or ""

    def show_citations(self, answer: str) -> None:
        from salachat.documents import cited_passages

        documents = self.chat.documents
        self.passages = cited_passages(documents, answer) if documents is not None else []
        self.query_one(Citations).show(self.passages)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id and event.button.id.startswith("cite-"):
            self.push_screen(PassageScreen(self.passages[int(event.button.id.removeprefix("cite-"))]))

    def _fail(self, error: BaseException) -> None:
        """One red line in the status, never a traceback (UserErrors already say what to do next)."""
        from salachat.errors import UserError

        text = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
        self.call_from_thread(self.set_status, f"[red]{text}[/red]")

    @work(thread=True, exclusive=True, group="model")
    def start(self, session: str | None = None) -> None:
        """Load the model, open the documents or the session, and read what is unread."""
        self.busy, self.stop_requested = True, False
        try:
            self.call_from_thread(self.set_status, "loading …")
            self.chat.open(session)
            self.call_from_thread(self._show_transcript)
            self.call_from_thread(self.update_side)
            start = self.clock()

            def progress(done: int, total: int, _elapsed: float) -> None:
                self.call_from_thread(self.show_reading, done, total, self.clock() - start)

            try:
                status = self.chat.read(progress, should_stop=lambda: self.stop_requested)
            finally:
                self.call_from_thread(self.hide_reading)
            self.call_from_thread(self.set_status, status)
        except Exception as e:  # noqa: BLE001 - the window shows one line and stays usable
            self._fail(e)
        finally:
            self.busy = False

    def _show_transcript(self) -> None:
        log = self.query_one("#log", VerticalScroll)
        log.remove_children()
        for turn in self.conversation.turns:
            self.add_message("question", turn.question)
            self.add_message("answer", turn.answer)

    @work(thread=True, exclusive=True, group="model")
    def answer(self, question: str) -> None:
        """Stream the answer into a new message, piece by piece, until done or Escape."""
        from salachat.engine.generate import Cancelled, Stats

        self.busy, self.stop_requested = True, False
        try:
            if self.conversation is None:
                self.call_from_thread(self.set_status, "[red]no model loaded: see the line above[/red]")
                return
            self.call_from_thread(self.set_status, "answering … (Esc stops)")
            widget = self.call_from_thread(self.add_message, "answer", "")
            stream = self.call_from_thread(Markdown.get_stream, widget)
            stats, text, unsent, sent_at = Stats(), "", "", self.clock()
            try:
                for piece in self.chat.ask(question, should_stop=lambda: self.stop_requested, stats=stats):
                    text, unsent = text + piece, unsent + piece
                    # a round trip to the event loop per token would slow the model on a busy CPU: at most
                    # STREAM_FPS updates a second
                    if self.clock() - sent_at >= 1 / STREAM_FPS:
                        self.call_from_thread(stream.write, unsent)
                        unsent, sent_at = "", self.clock()
            except Cancelled:
                pass
            finally:
                if unsent:
                    self.call_from_thread(stream.write, unsent)
                self.call_from_thread(stream.stop)
            rate = stats.to_dict().get("decode_tokens_per_second")
            stopped = " (stopped)" if stats.stopped_by == "cancelled" else ""
            self.call_from_thread(self.set_status, f"answered{stopped}" + (f" · {rate:.1f} tok/s" if rate else ""))
            self.call_from_thread(self.show_citations, text)
            self.call_from_thread(self.update_side)
        except Exception as e:  # noqa: BLE001 - one line in the window, never a traceback
            self._fail(e)
        finally:
            self.busy = False

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "question" or not event.value.strip():
            return
        if self.busy:
            self.set_status("busy: wait, or Esc to stop")
            return
        question = event.value.strip()
        self.history.append(question)
        self.history_at = len(self.history)
        event.input.value = ""
        self.add_message("question", question)
        self.answer(question)

    def on_key(self, event) -> None:
        """↑/↓ in the question box walk through the questions asked."""
        if event.key not in ("up", "down") or not self.history or self.screen is not self.screen_stack[0]:
            return
        box = self.query_one("#question", Input)
        if not box.has_focus:
            return
        step = -1 if event.key == "up" else 1
        self.history_at = max(0, min(len(self.history), self.history_at + step))
        box.value = self.history[self.history_at] if self.history_at < len(self.history) else ""
        box.cursor_position = len(box.value)
        event.stop()

    def action_stop(self) -> None:
        if self.busy:
            self.stop_requested = True
            self.set_status("stopping …")

    async def action_quit(self) -> None:
        """Stop the model between chunks or tokens first, so that a session keeps what was read."""
        self.stop_requested = True
        await self.workers.wait_for_complete()
        self.exit(0)

    def action_sessions(self) -> None:
        def opened(name: str | None) -> None:
            if not name:
                return
            if self.busy:
                self.set_status("busy: Esc stops, then open the session")
                return
            self.start(name)

        self.push_screen(SessionsScreen(), opened)
