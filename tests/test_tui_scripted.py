"""The chat window over a small scripted engine (no model): what the window does with the ChatSession it
drives. The scripted session follows ChatSession's interface (salachat/chat.py) and its timing is ours, so
these tests are quick and exact; test_tui_chat.py drives the real model."""

import asyncio
import functools
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from rich.text import Text
from textual import events

from salachat.chat import Context, DocumentLine
from salachat.conversation import Turn
from salachat.tui.app import Answer, Options, SalaChat
from salachat.tui.screens import ConfirmScreen, PassageScreen, SessionsScreen

HOSTILE = "[/x] [bold]not bold[/bold] [p.12]"  # markup that must show as typed
FILE_NAME = "[bold]x[red] [p.12].md"  # a file name cannot hold "/"; markup it can


def sync(test):
    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return run


@dataclass
class Scripted:
    """A ChatSession as the window sees it: reading in chunks, then answers from a script."""

    pending_tokens: int = 0
    answers: list = field(default_factory=lambda: ["The keeper ", "was ", "Tomas ", "Brandt [p.3]."])
    session_name: str | None = None
    document_lines: list = field(default_factory=lambda: [DocumentLine(f"docs/{FILE_NAME}", "markdown", 2, 40)])
    passages: list = field(default_factory=list)
    chunk: int = 10
    delay: float = 0.01
    tokens: int = 0
    turns: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    reads: list = field(default_factory=list)  # progress seen, (done, total)
    loaded: object = field(default_factory=lambda: SimpleNamespace(long_context="dense"))

    @property
    def conversation(self):
        return SimpleNamespace(tokens_in_context=self.tokens, turns=self.turns)

    def context(self) -> Context:
        return Context(tokens=self.tokens, pending_tokens=self.pending_tokens, document_tokens=40, limit=8192,
                       trained_length=8192, long_context="dense", state_bytes=1 << 20, device="CPU")

    def read(self, progress=None, should_stop=None):
        from salachat.engine.generate import Cancelled

        total = self.tokens + self.pending_tokens
        while self.pending_tokens:
            if should_stop is not None and should_stop():
                raise Cancelled("stopped")
            time.sleep(self.delay)
            step = min(self.chunk, self.pending_tokens)
            self.tokens, self.pending_tokens = self.tokens + step, self.pending_tokens - step
            self.reads.append((self.tokens, total))
            if progress is not None:
                progress(self.tokens, total, 0.1)

    def ask(self, question, sampling=None, *, progress=None, should_stop=None, stats=None):
        if self.pending_tokens:
            self.read(progress, should_stop)
        turn = Turn(question, "")
        self.turns.append(turn)
        for piece in self.answers:
            if should_stop is not None and should_stop():
                if stats is not None:
                    stats.stopped_by = "cancelled"
                return
            time.sleep(self.delay)
            turn.answer += piece
            self.tokens += 1
            yield piece
        if stats is not None:
            stats.generated_tokens, stats.stopped_by = len(self.answers), "stop_token"

    def cited_passages(self, answer):
        return self.passages if "[p.3]" in answer else []


async def wait_until(pilot, condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await pilot.pause(0.01)


async def settle(pilot):
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


def status(app) -> str:
    return str(app.query_one("#status").render())


def window(chats: dict, **options) -> SalaChat:
    """The app, opening `chats[session]` (None: the documents' chat)."""
    return SalaChat(Options(**options), open_chat=lambda _options, session: chats[session])


@sync
async def test_document_and_answer_text_show_as_typed_never_as_markup():
    chat = Scripted(answers=[HOSTILE])
    app = window({None: chat})
    async with app.run_test(size=(110, 32)) as pilot:
        await settle(pilot)
        assert f"{FILE_NAME} · 2 parts · 40 tokens" in str(app.query_one("#docs").render())
        app.query_one("#question").value = HOSTILE
        await pilot.press("enter")
        await settle(pilot)
        messages = [w.source for w in app.query(Answer)]
        assert messages == [HOSTILE, HOSTILE]  # the question and the answer, as Markdown source
        app.set_status(Text(HOSTILE))
        await pilot.pause()
        assert HOSTILE in status(app)


@sync
async def test_a_reading_left_for_the_first_question_shows_its_progress_bar():
    chat = Scripted(pending_tokens=60, delay=0.03)
    app = window({None: chat})
    async with app.run_test(size=(110, 32)) as pilot:
        await wait_until(pilot, lambda: app.query_one("#reading").display)
        await pilot.press("escape")  # stop the reading when the window opens …
        await settle(pilot)
        assert chat.pending_tokens and "reading stopped" in status(app)
        assert not app.query_one("#reading").display
        app.query_one("#question").value = "Who kept the light?"
        app.post_message(events.Key("enter", "\r"))  # … then ask: the rest is read first, with its bar
        await wait_until(pilot, lambda: app.busy)
        labels = set()
        while app.busy:
            if app.query_one("#reading").display:
                labels.add(str(app.query_one("#read-label").render()))
            await pilot.pause(0.005)
        await settle(pilot)
        assert any("/ 60 tokens" in label for label in labels), labels
        assert not chat.pending_tokens and chat.turns[-1].answer == "".join(chat.answers)
        assert "answered" in status(app)


@sync
async def test_the_side_panel_follows_the_reading():
    chat = Scripted(pending_tokens=200, delay=0.02)
    app = window({None: chat})
    async with app.run_test(size=(110, 32)) as pilot:
        seen = set()
        await wait_until(pilot, lambda: app.query_one("#reading").display)
        while app.query_one("#reading").display:
            seen.add(str(app.query_one("#context").render()).split(" tokens")[0])
            await pilot.pause(0.01)
        await settle(pilot)
        counts = sorted(int(s.replace(",", "")) for s in seen if s.replace(",", "").isdigit())
        assert len(counts) >= 3 and 0 < counts[1] < 200  # the gauge moved while reading, not only at the end
        assert str(app.query_one("#context").render()).startswith("200 tokens")


@sync
async def test_opening_a_saved_session_asks_before_dropping_an_unsaved_chat(monkeypatch):
    unsaved, saved = Scripted(), Scripted(session_name="keeper", tokens=99)
    app = window({None: unsaved, "keeper": saved})
    monkeypatch.setattr(SessionsScreen, "on_mount", lambda self: None)  # no catalogue: the dialog's result
    async with app.run_test(size=(110, 32)) as pilot:
        await settle(pilot)
        app.query_one("#question").value = "Who?"
        await pilot.press("enter")
        await settle(pilot)
        assert app.unsaved
        await pilot.press("ctrl+o")
        app.screen.dismiss("keeper")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen) and "not saved" in str(app.screen.query_one(
            "#confirm-question").render())
        await pilot.press("n")
        await settle(pilot)
        assert app.chat is unsaved and "kept this chat" in status(app)
        await pilot.press("ctrl+o")
        app.screen.dismiss("keeper")
        await pilot.pause()
        await pilot.press("y")
        await settle(pilot)
        assert app.chat is saved and app.sub_title == "keeper" and "session keeper: ready" in status(app)
        await pilot.press("ctrl+o")  # a saved chat is switched away from without a question
        app.screen.dismiss("keeper")
        await settle(pilot)
        assert not isinstance(app.screen, ConfirmScreen)


@sync
async def test_ctrl_n_opens_the_cited_passages_in_turn():
    passages = [SimpleNamespace(source=f"{HOSTILE}.pdf", anchor="p.3", text="Tomas Brandt kept the light."),
                SimpleNamespace(source="b.pdf", anchor="p.4", text="It burned whale oil.")]
    chat = Scripted(passages=passages)
    app = window({None: chat})
    async with app.run_test(size=(110, 32)) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+n")
        assert "cites no passage" in status(app)
        app.query_one("#question").value = "Who?"
        await pilot.press("enter")
        await settle(pilot)
        assert "Cited passage" in str(app.query_one("Footer").screen.active_bindings.get("ctrl+n").binding.description)
        await pilot.press("ctrl+n")
        assert isinstance(app.screen, PassageScreen)
        assert HOSTILE in str(app.screen.query_one("#passage-title").render())
        await pilot.press("escape")
        await pilot.press("ctrl+n")
        assert "whale oil" in str(app.screen.query_one("#passage-text").render())


@sync
async def test_a_failure_is_the_command_lines_one_line():
    from salachat.sessions import SessionError

    def fail(_options, _session):
        raise SessionError(f"no session named {HOSTILE!r}")

    app = SalaChat(Options(), open_chat=fail)
    async with app.run_test() as pilot:
        await settle(pilot)
        assert f"no session named {HOSTILE!r}" in status(app)


@pytest.mark.parametrize("question", ["", "   "])
def test_blank_questions_are_not_sent(question):
    async def drive():
        chat = Scripted()
        app = window({None: chat})
        async with app.run_test() as pilot:
            await settle(pilot)
            app.query_one("#question").value = question
            await pilot.press("enter")
            await settle(pilot)
            assert not chat.turns
    asyncio.run(drive())


@sync
async def test_the_long_context_line_stays_in_the_log():
    line = "the documents are 9,000 tokens, past the model's trained 8,192: reading with the long-context extension"
    chat = Scripted(pending_tokens=30, notes=[line])
    app = window({None: chat})
    async with app.run_test(size=(110, 32)) as pilot:
        await settle(pilot)
        assert [w.source for w in app.query(Answer) if w.has_class("note")] == [line]
        assert "ask away" in status(app)
