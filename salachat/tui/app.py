"""The chat window: a face over salachat.chat.ChatSession, the model running in thread workers.

The event loop only draws: loading the model, reading and generating run in thread workers that call the
ChatSession and hand their progress back with `call_from_thread`. Stopping (Escape) sets a flag the engine
polls between reading chunks and between tokens, so a stop is prompt and leaves the state consistent (and,
with a session, saved). All user and document text is shown as text (rich.text.Text), never as markup.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Footer, Header, Input, Markdown

from salachat.tui.screens import ConfirmScreen, PassageScreen, SessionsScreen
from salachat.tui.widgets import Answer, Citations, ReadingBar, SidePanel

__all__ = ["Answer", "Options", "SalaChat"]

STREAM_FPS = 20  # answer and side-panel updates a second while the model works


@dataclass
class Options:
    """What `salachat chat` / `salachat resume ID` asked for (ChatSession.open's arguments)."""

    paths: list[Path] = field(default_factory=list)
    session: str | None = None  # save as (or continue) this session
    model: str | None = None
    device: str = "auto"
    quant: str | None = None
    dtype: object = None  # torch.dtype or None (the device's default)
    long_context: str = "auto"
    system_prompt: str | None = None
    password: str | None = None
    sampling: object = None  # engine.generate.Sampling; None: from max_tokens and temperature
    max_tokens: int = 512
    temperature: float = 0.0
    chunk_size: int | None = None  # tokens per reading step (None: the engine's default for the device)
    engine: str | None = None  # an OpenAI-compatible server's URL: the conversation is a salachat.remote one

    def make_sampling(self):
        from salachat.engine.generate import Sampling

        return self.sampling if self.sampling is not None else Sampling(temperature=self.temperature,
                                                                        max_tokens=self.max_tokens)


class SalaChat(App[int]):
    TITLE = "salachat"
    CSS_PATH = "styles.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+o", "sessions", "Sessions"),
        Binding("ctrl+n", "passage", "Cited passage"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, options: Options, loaded=None, clock=time.perf_counter, open_chat=None):
        """`open_chat(options, session)` replaces ChatSession.open/resume (tests drive a scripted engine)."""
        super().__init__()
        self.options = options
        self.loaded = loaded  # a model opened once (tests); else the first open loads it
        self.open_chat = open_chat
        self.chat = None  # the salachat.chat.ChatSession, once opened
        self.clock = clock
        self.stop_requested = False
        self.busy = False
        self.history: list[str] = []
        self.history_at = 0
        self.passages: list = []
        self.passage_at = 0
        self._side_at = 0.0

    @property
    def conversation(self):
        return getattr(self.chat, "conversation", None)

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

    def set_status(self, text: str | Text) -> None:
        self.query_one(SidePanel).set_status(text)

    def add_message(self, who: str, text: str) -> Answer:
        widget = Answer(text, classes=who)
        self.query_one("#log", VerticalScroll).mount(widget)
        return widget

    def show_reading(self, done: int, total: int, elapsed: float) -> None:
        self.query_one(ReadingBar).show(done, total, elapsed)
        now = self.clock()
        if now - self._side_at >= 1 / STREAM_FPS or done >= total:  # the side panel follows the reading
            self._side_at = now
            self.update_side()

    def hide_reading(self) -> None:
        self.query_one(ReadingBar).hide()
        self.update_side()

    def update_side(self) -> None:
        if self.chat is None:
            return
        side = self.query_one(SidePanel)
        side.show_documents([str(line) for line in self.chat.document_lines], self.chat.context().document_tokens)
        side.show_context(self.chat.context())
        self.sub_title = self.chat.session_name or ""

    def show_citations(self, answer: str) -> None:
        self.passages = self.chat.cited_passages(answer) if self.chat is not None else []
        self.passage_at = 0
        self.query_one(Citations).show(self.passages)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id and event.button.id.startswith("cite-"):
            self.push_screen(PassageScreen(self.passages[int(event.button.id.removeprefix("cite-"))]))

    def action_passage(self) -> None:
        """Ctrl+N: the last answer's cited passages, one after the other."""
        if not self.passages:
            self.set_status("the last answer cites no passage")
            return
        passage = self.passages[self.passage_at % len(self.passages)]
        self.passage_at += 1
        self.push_screen(PassageScreen(passage))

    def _fail(self, error: BaseException) -> None:
        """One red line in the status, never a traceback: the same line the command line prints."""
        from salachat.errors import classify

        self.call_from_thread(self.set_status, Text(classify(error).message, style="red"))

    def _progress(self):
        start = self.clock()

        def progress(done: int, total: int, _elapsed: float) -> None:
            self.call_from_thread(self.show_reading, done, total, self.clock() - start)

        return progress

    def _open(self, session: str | None):
        from salachat.chat import ChatSession

        options = self.options
        if self.open_chat is not None:
            return self.open_chat(options, session)
        if options.engine is not None:
            from salachat.remote import RemoteSession

            if session is not None:
                return RemoteSession.resume(options.engine, session)
            return RemoteSession.open(options.engine, paths=options.paths, session=options.session,
                                      model=options.model, system_prompt=options.system_prompt,
                                      password=options.password)
        if session is not None:
            return ChatSession.resume(session, model=options.model, device=options.device,
                                      chunk_size=options.chunk_size, loaded=self._loaded_for_resume())
        return ChatSession.open(paths=options.paths, session=options.session, model=options.model,
                                device=options.device, quant=options.quant, dtype=options.dtype,
                                long_context=options.long_context, system_prompt=options.system_prompt,
                                password=options.password, chunk_size=options.chunk_size, loaded=self.loaded,
                                on_note=lambda line: self.call_from_thread(self.set_status, Text(line)))

    def _loaded_for_resume(self):
        return self.loaded if self.loaded is not None else (self.chat.loaded if self.chat is not None else None)

    @work(thread=True, exclusive=True, group="model")
    def start(self, session: str | None = None) -> None:
        """Open the documents or the session (loading the model first) and read what is unread."""
        from salachat.engine.generate import Cancelled

        self.busy, self.stop_requested = True, False
        try:
            self.call_from_thread(self.set_status, "loading …")
            chat = self._open(session if session is not None else (
                self.options.session if not self.options.paths else None))
            loaded = getattr(chat, "loaded", None)  # None: a conversation on a server (--engine)
            if self.loaded is None and self.open_chat is None and loaded is not None \
                    and loaded.long_context != "extended":
                self.loaded = loaded  # the next session opened reuses the model
            chat.document_lines  # noqa: B018 - counted here, in the worker, not on the event loop
            self.chat = chat
            self.call_from_thread(self._show_transcript)
            self.call_from_thread(self.update_side)
            for line in chat.notes:  # the long-context switch and the like: kept in the log, not only the status
                self.call_from_thread(self.add_message, "note", line)
            if not chat.pending_tokens:
                name = chat.session_name
                self.call_from_thread(self.set_status, Text(f"session {name}: ready" if name else "ready"))
                return
            try:
                chat.read(self._progress(), should_stop=lambda: self.stop_requested)
            except Cancelled:
                resume = f"; `salachat resume {chat.session_name}` continues" if chat.session_name else ""
                self.call_from_thread(self.set_status, Text(
                    f"reading stopped at {chat.context().tokens:,} tokens{resume}"))
                return
            finally:
                self.call_from_thread(self.hide_reading)
            self.call_from_thread(self.set_status, Text(f"read {chat.context().document_tokens:,} tokens: ask away"))
        except Exception as e:  # noqa: BLE001 - the window shows one line and stays usable
            self._fail(e)
        finally:
            self.busy = False

    def _show_transcript(self) -> None:
        log = self.query_one("#log", VerticalScroll)
        log.remove_children()
        for turn in self.chat.turns:
            self.add_message("question", turn.question)
            self.add_message("answer", turn.answer)

    @work(thread=True, exclusive=True, group="model")
    def answer(self, question: str) -> None:
        """Stream the answer into a new message, piece by piece, until done or Escape."""
        from salachat.engine.generate import Cancelled, Stats

        self.busy, self.stop_requested = True, False
        try:
            chat = self.chat
            if chat is None:
                self.call_from_thread(self.set_status, Text("no model loaded: see the line above", style="red"))
                return
            reading = chat.pending_tokens > 0
            self.call_from_thread(self.set_status, "reading first … (Esc stops)" if reading else
                                  "answering … (Esc stops)")
            widget = self.call_from_thread(self.add_message, "answer", "")
            stream = self.call_from_thread(Markdown.get_stream, widget)
            stats, text, unsent, sent_at = Stats(), "", "", self.clock()
            try:
                pieces = chat.ask(question, self.options.make_sampling(), progress=self._progress(),
                                  should_stop=lambda: self.stop_requested, stats=stats)
                for piece in pieces:
                    if reading:  # the reading that came first is done
                        reading = False
                        self.call_from_thread(self.hide_reading)
                        self.call_from_thread(self.set_status, "answering … (Esc stops)")
                    text, unsent = text + piece, unsent + piece
                    # a round trip to the event loop per token would slow the model on a busy CPU: at most
                    # STREAM_FPS updates a second
                    if self.clock() - sent_at >= 1 / STREAM_FPS:
                        self.call_from_thread(stream.write, unsent)
                        unsent, sent_at = "", self.clock()
            except Cancelled:
                pass
            finally:
                if reading:
                    self.call_from_thread(self.hide_reading)
                if unsent:
                    self.call_from_thread(stream.write, unsent)
                self.call_from_thread(stream.stop)
            if chat.pending_tokens:  # stopped while still reading: no question was asked
                resume = f"; `salachat resume {chat.session_name}` continues" if chat.session_name else ""
                self.call_from_thread(self.set_status, Text(
                    f"reading stopped at {chat.context().tokens:,} tokens{resume}"))
                return
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

    @property
    def unsaved(self) -> bool:
        """A conversation with questions that no session keeps."""
        return self.chat is not None and self.chat.session_name is None and bool(self.chat.turns)

    def action_sessions(self) -> None:
        def switch(name: str) -> None:
            if self.busy:
                self.set_status("busy: Esc stops, then open the session")
                return
            self.start(name)

        def opened(name: str | None) -> None:
            if not name:
                return
            if not self.unsaved:
                switch(name)
                return
            questions = len(self.chat.turns)
            self.push_screen(ConfirmScreen(f"This chat ({questions} questions) is not saved. Drop it and open "
                                           f"session {name}?"),
                             lambda yes: switch(name) if yes else self.set_status("kept this chat"))

        self.push_screen(SessionsScreen(), opened)
