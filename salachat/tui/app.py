"""The chat window: a conversation with documents, the model running in worker threads.

The event loop only draws: loading the model, reading documents and generating run in thread workers that
post their progress back with `call_from_thread`. Stopping (Escape) sets a flag the engine polls between
chunks and tokens, so a stop is prompt and leaves the cache consistent (and, with a session, saved).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Footer, Header, Input, Label, Markdown, ProgressBar, Static

from salachat.tui.screens import PassageScreen, SessionsScreen


@dataclass
class Options:
    paths: list[Path] = field(default_factory=list)
    session: str | None = None  # save as (or continue) this session
    model: str | None = None
    device: str = "auto"
    quant: str | None = None
    max_tokens: int = 512
    temperature: float = 0.0
    chunk_size: int | None = None  # tokens per reading step (None: the engine's default for the device)


class Answer(Markdown):
    """One answer, re-rendered as its text grows."""


class SalaChat(App):
    TITLE = "salachat"
    CSS_PATH = "styles.tcss"
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+o", "sessions", "Sessions"),
        Binding("ctrl+q", "quit", "Quit"),
    ]

    def __init__(self, options: Options, loaded=None, clock=time.perf_counter):
        super().__init__()
        self.options = options
        self.loaded = loaded  # tests pass the model in, loaded once
        self.clock = clock
        self.conversation = None
        self.documents = None
        self.writer = None
        self.stop_requested = False
        self.busy = False
        self.history: list[str] = []
        self.history_at = 0
        self.passages: list = []

    # ---- layout ----
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="main"):
                yield VerticalScroll(id="log")
                with Horizontal(id="reading"):
                    yield ProgressBar(id="read-bar", show_eta=False)
                    yield Label("", id="read-label")
                yield Horizontal(id="citations")
                yield Input(placeholder="Ask about the documents …  (Enter to send, ↑/↓ history)", id="question")
            with Vertical(id="side"):
                yield Label("[b]Documents[/b]")
                yield Static("none", id="docs")
                yield Label("[b]Context[/b]")
                yield ProgressBar(id="gauge", show_eta=False, show_percentage=False)
                yield Static("", id="context")
                yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#reading").display = False
        self.query_one("#question", Input).focus()
        self.sub_title = self.options.session or ""
        self.start()

    # ---- helpers used from workers (through call_from_thread) ----
    def set_status(self, text: str) -> None:
        self.query_one("#status", Static).update(text)

    def add_message(self, who: str, text: str) -> Answer:
        widget = Answer(text, classes=who)
        log = self.query_one("#log", VerticalScroll)
        log.mount(widget)
        log.scroll_end(animate=False)
        return widget

    def show_reading(self, done: int, total: int, elapsed: float) -> None:
        self.query_one("#reading").display = True
        self.query_one("#read-bar", ProgressBar).update(total=total, progress=done)
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (total - done) / rate if rate > 0 else 0.0
        self.query_one("#read-label", Label).update(
            f"read {done:,} / {total:,} tokens · {rate:,.0f} tok/s · {left:,.0f} s left")

    def hide_reading(self) -> None:
        self.query_one("#reading").display = False

    def update_side(self) -> None:
        docs = self.query_one("#docs", Static)
        if self.documents is not None:
            lines = [f"{d['source'].rsplit('/', 1)[-1]} ({d['segments']} parts)" for d in self.documents.summary()]
            docs.update("\n".join(lines) + f"\n{self.conversation.document_tokens:,} tokens")
        elif self.conversation is not None and self.conversation.document_tokens:
            docs.update(f"(from the session)\n{self.conversation.document_tokens:,} tokens")
        if self.conversation is None:
            return
        used = self.conversation.tokens_in_context
        limit = self.conversation.max_context
        tensors, _ = self.conversation.cache.state()
        state_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        where = self.loaded.device.type.upper() if self.loaded is not None else ""
        gauge = self.query_one("#gauge", ProgressBar)
        gauge.update(total=limit or max(used, 1), progress=used)
        self.query_one("#context", Static).update(
            f"{used:,} tokens" + (f" of {limit:,}" if limit else "") + f"\nstate {state_bytes / 2**20:,.1f} MiB ({where})")

    def show_citations(self, answer: str) -> None:
        from salachat.documents import cited_passages

        bar = self.query_one("#citations", Horizontal)
        bar.remove_children()
        self.passages = cited_passages(self.documents, answer) if self.documents is not None else []
        for i, passage in enumerate(self.passages):
            bar.mount(Button(f"[{passage.anchor}]", id=f"cite-{i}", compact=True))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id and event.button.id.startswith("cite-"):
            self.push_screen(PassageScreen(self.passages[int(event.button.id[5:])]))

    # ---- workers ----
    @work(thread=True, exclusive=True, group="model")
    def start(self, session_to_open: str | None = None) -> None:
        """Load the model, the documents or session, and read them."""
        from salachat.errors import UserError

        self.busy = True
        try:
            self._start(session_to_open)
        except UserError as e:
            self.call_from_thread(self.set_status, f"[red]{e}[/red]")
        except Exception as e:  # noqa: BLE001 - the app must show one line, never die with a traceback
            self.call_from_thread(self.set_status, f"[red]{type(e).__name__}: {e}[/red]")
        finally:
            self.busy = False

    def _start(self, session_to_open: str | None) -> None:
        from salachat import cli_sessions
        from salachat.conversation import ContextTooLong, Conversation
        from salachat.documents import load_documents

        o = self.options
        if self.loaded is None:
            self.call_from_thread(self.set_status, f"loading {o.model or 'the default model'} …")
            if session_to_open or o.session and not o.paths:
                manifest = cli_sessions._manifest(session_to_open or o.session)
                self.loaded = cli_sessions._load_for(manifest, o.model, o.device, spinner=False)
            else:
                from salachat.cli import _load

                self.loaded = _load(o.model, o.device, o.quant, False, spinner=False)
        self.writer = None
        if session_to_open or (o.session and not o.paths):
            name = session_to_open or o.session
            self.conversation, self.writer = self._open_session(name)
            self.documents = None
            self.call_from_thread(self._replay_transcript)
        elif o.paths:
            self.call_from_thread(self.set_status, "reading the files …")
            self.documents = load_documents(o.paths)
            if o.session:
                self.conversation, self.writer = cli_sessions.conversation_for_ask(o.session, self.documents, self.loaded)
            else:
                self.conversation = Conversation(self.loaded, chunk_size=o.chunk_size)
                try:
                    self.conversation.set_documents(self.documents.prompt_text)
                except ContextTooLong as e:
                    from salachat.errors import UserError

                    raise UserError(str(e)) from None
        else:
            self.conversation = Conversation(self.loaded)
        self.call_from_thread(self.update_side)
        self._read()
        if self.writer is not None and not self.conversation.pending_ids:
            self.call_from_thread(self.set_status, f"session {self.writer.folder.name}: "
                                                   f"{self.conversation.tokens_in_context:,} tokens, ready")

    def _open_session(self, name: str):
        from salachat import cli_sessions
        from salachat.sessions import SessionWriter, load_conversation

        conversation, _ = load_conversation(cli_sessions._folder(name), self.loaded)
        return conversation, SessionWriter(cli_sessions._folder(name))

    def _replay_transcript(self) -> None:
        self.query_one("#log", VerticalScroll).remove_children()
        for turn in self.conversation.turns:
            self.add_message("question", turn.question)
            self.add_message("answer", turn.answer)
        self.sub_title = self.writer.folder.name if self.writer else ""

    def _read(self) -> None:
        """Read what is queued, with progress; a stop keeps what was read (and, with a session, saves it)."""
        from engine.generate import Cancelled

        conversation = self.conversation
        if not conversation.pending_ids:
            self.call_from_thread(self.set_status, "ready")
            return
        self.stop_requested = False
        on_chunk = None
        if self.writer is not None:
            from salachat.sessions import Checkpointer

            on_chunk = Checkpointer(self.writer.save)
        start = self.clock()

        def progress(done, total, _elapsed):
            self.call_from_thread(self.show_reading, done, total, self.clock() - start)

        try:
            conversation.read(progress, should_stop=lambda: self.stop_requested, on_chunk=on_chunk)
            if self.writer is not None:
                self.writer.save(conversation)
            self.call_from_thread(self.set_status, f"read {conversation.document_tokens:,} tokens: ask away")
        except Cancelled:
            kept = conversation.tokens_in_context
            how = f"; `salachat resume {self.writer.folder.name}` continues" if self.writer else ""
            self.call_from_thread(self.set_status, f"reading stopped at {kept:,} tokens{how}")
        finally:
            self.call_from_thread(self.hide_reading)
            self.call_from_thread(self.update_side)

    @work(thread=True, exclusive=True, group="model")
    def answer(self, question: str) -> None:
        from engine.generate import Cancelled, Sampling, Stats
        from salachat.conversation import ContextTooLong

        self.busy = True
        try:
            if self.conversation is None:
                self.call_from_thread(self.set_status, "[red]the model is not loaded yet[/red]")
                return
            self.stop_requested = False
            widget = self.call_from_thread(self.add_message, "answer", "…")
            sampling = Sampling(temperature=self.options.temperature, max_tokens=self.options.max_tokens)
            stats, text = Stats(), ""
            self.call_from_thread(self.set_status, "answering … (Esc stops)")
            try:
                for piece in self.conversation.ask(question, sampling, should_stop=lambda: self.stop_requested,
                                                   stats=stats):
                    text += piece
                    self.call_from_thread(widget.update, text)
                    self.call_from_thread(self.query_one("#log", VerticalScroll).scroll_end, animate=False)
            except Cancelled:
                pass
            except ContextTooLong as e:
                self.call_from_thread(self.set_status, f"[red]{e}[/red]")
                return
            stopped = " (stopped)" if self.stop_requested else ""
            if self.writer is not None:
                self.writer.save(self.conversation)
            rate = stats.to_dict().get("decode_tokens_per_second")
            self.call_from_thread(self.set_status, f"answered{stopped}" + (f" · {rate:.1f} tok/s" if rate else ""))
            self.call_from_thread(self.show_citations, text)
            self.call_from_thread(self.update_side)
        except Exception as e:  # noqa: BLE001 - one line in the app, never a traceback
            self.call_from_thread(self.set_status, f"[red]{type(e).__name__}: {e}[/red]")
        finally:
            self.busy = False

    # ---- input and keys ----
    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "question":
            return
        question = event.value.strip()
        if not question:
            return
        if self.busy:
            self.set_status("busy: wait, or Esc to stop")
            return
        self.history.append(question)
        self.history_at = len(self.history)
        event.input.value = ""
        self.add_message("question", question)
        self.answer(question)

    def on_key(self, event) -> None:
        box = self.query_one("#question", Input)
        if not box.has_focus or not self.history or event.key not in ("up", "down"):
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

    def action_sessions(self) -> None:
        def opened(name: str | None) -> None:
            if name and not self.busy:
                self.start(name)

        self.push_screen(SessionsScreen(), opened)
