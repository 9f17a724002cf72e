"""The chat window driven through Textual's pilot, with the real default model and the bundled sample PDF."""

import asyncio
import functools
from pathlib import Path

import pytest

from salachat.tui.app import Answer, Options, SalaChat
from salachat.tui.screens import PassageScreen, SessionsScreen

SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "sample.pdf"
QUESTION = "Who kept the light for thirty-one years?"


def sync(test):
    """Run an async pilot test in its own event loop (no pytest-asyncio needed)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return run


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    from salachat.paths import set_data_dir

    monkeypatch.setenv("SALACHAT_HOME", str(tmp_path / "home"))
    set_data_dir(None)
    return tmp_path / "home"


async def settle(pilot):
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


def status(app) -> str:
    return str(app.query_one("#status").render())


@sync
async def test_reads_the_document_with_progress_then_streams_an_answer(smollm2, monkeypatch):
    updates, reads = [], []
    real_update, real_reading = Answer.update, SalaChat.show_reading
    monkeypatch.setattr(Answer, "update", lambda self, text: (updates.append(text), real_update(self, text))[1])
    monkeypatch.setattr(SalaChat, "show_reading", lambda self, *a: (reads.append(a), real_reading(self, *a))[1])
    app = SalaChat(Options(paths=[SAMPLE], max_tokens=10, chunk_size=128), loaded=smollm2)
    async with app.run_test(size=(110, 32)) as pilot:
        await settle(pilot)
        assert len(reads) >= 2 and reads[-1][0] == reads[-1][1] == app.conversation.document_tokens
        assert [done for done, _, _ in reads] == sorted(done for done, _, _ in reads)  # progress only advances
        assert "ask away" in status(app) and not app.query_one("#reading").display
        assert "sample.pdf" in str(app.query_one("#docs").render())
        await pilot.click("#question")
        await pilot.press(*QUESTION, "enter")
        await settle(pilot)
        answers = [w for w in app.query(Answer) if w.has_class("answer")]
        assert len(answers) == 1 and app.conversation.turns[-1].answer.strip()
        assert len(updates) >= 3 and updates[-1] == app.conversation.turns[-1].answer  # streamed, piece by piece
        assert app.conversation.turns[-1].stats["generated_tokens"] <= 10
        await pilot.press("up")
        assert app.query_one("#question").value == QUESTION  # history


@sync
async def test_escape_stops_the_reading_between_chunks_and_keeps_what_was_read(smollm2, monkeypatch):
    app = SalaChat(Options(paths=[SAMPLE], chunk_size=16), loaded=smollm2)
    seen = []

    def progress_then_stop(self, done, total, elapsed):
        seen.append(done)
        if len(seen) == 2:
            self.action_stop()  # what Escape does

    monkeypatch.setattr(SalaChat, "show_reading", progress_then_stop)
    async with app.run_test() as pilot:
        await settle(pilot)
        kept = app.conversation.tokens_in_context
        assert "reading stopped" in status(app)
        assert 0 < kept < app.conversation.document_tokens and app.conversation.pending_ids


@sync
async def test_escape_stops_a_generation(smollm2, monkeypatch):
    app = SalaChat(Options(max_tokens=200), loaded=smollm2)
    real_update = Answer.update

    def update_then_stop(self, text):
        result = real_update(self, text)
        if self.has_class("answer") and len(text) > 3:
            app.action_stop()
        return result

    monkeypatch.setattr(Answer, "update", update_then_stop)
    async with app.run_test() as pilot:
        await settle(pilot)
        app.query_one("#question").value = "Tell me a long story about a lighthouse."
        await pilot.press("enter")
        await settle(pilot)
        turn = app.conversation.turns[-1]
        assert turn.stats["stopped_by"] == "cancelled" and turn.stats["generated_tokens"] < 50
        assert "stopped" in status(app)


def _save_session(smollm2, name: str) -> int:
    from salachat.conversation import Conversation
    from salachat.documents import load_documents
    from salachat.paths import sessions_dir
    from salachat.sessions import SessionWriter

    documents = load_documents([SAMPLE])
    conversation = Conversation(smollm2)
    conversation.set_documents(documents.prompt_text)
    conversation.read()
    SessionWriter(sessions_dir() / name, documents=documents.summary()).save(conversation)
    return conversation.tokens_in_context


@sync
async def test_session_list_renames_deletes_and_opens_a_saved_session(smollm2, home):
    tokens = _save_session(smollm2, "lighthouse")
    _save_session(smollm2, "scratch")
    app = SalaChat(Options(), loaded=smollm2)
    async with app.run_test(size=(110, 32)) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+o")
        assert isinstance(app.screen, SessionsScreen)
        table = app.screen.query_one("#sessions-table")
        names = [table.get_row_at(i)[0] for i in range(table.row_count)]
        assert sorted(names) == ["lighthouse", "scratch"]
        table.move_cursor(row=names.index("scratch"))
        await pilot.press("d")
        assert not (home / "sessions" / "scratch").exists() and table.row_count == 1
        table.move_cursor(row=0)
        await pilot.press("r")
        app.screen.query_one("#prompt-input").value = "keeper"
        await pilot.press("enter")
        await pilot.pause()
        assert (home / "sessions" / "keeper").is_dir() and not (home / "sessions" / "lighthouse").exists()
        await pilot.press("enter")  # open it
        await settle(pilot)
        assert not isinstance(app.screen, SessionsScreen), status(app)
        assert app.conversation.tokens_in_context == tokens and app.writer.folder.name == "keeper", status(app)
        assert "session keeper" in status(app)


@sync
async def test_a_cited_anchor_opens_its_passage(smollm2):
    app = SalaChat(Options(paths=[SAMPLE]), loaded=smollm2)
    async with app.run_test(size=(110, 32)) as pilot:
        await settle(pilot)
        app.show_citations("Tomas Brandt kept the light [p.3]; it was built in 1871 [p.2].")
        await pilot.pause()
        assert [str(b.label) for b in app.query("#citations Button")] == ["[p.3]", "[p.2]"]
        await pilot.click("#cite-0")
        await pilot.pause()
        assert isinstance(app.screen, PassageScreen)
        assert "thirty-one years" in " ".join(str(app.screen.query_one("#passage-text").render()).split())


@sync
async def test_a_missing_model_is_one_line_in_the_window(monkeypatch):
    app = SalaChat(Options(model=str(Path("/nonexistent/model.gguf")), device="cpu"))
    async with app.run_test() as pilot:
        await settle(pilot)
        text = status(app)
        assert "model.gguf" in text and "Traceback" not in text


# ---- snapshots of the main screens (fixed size; nothing time-dependent on them) ----

def test_snapshot_empty_chat(snap_compare, smollm2):
    assert snap_compare(SalaChat(Options(), loaded=smollm2), terminal_size=(100, 28), run_before=settle)


def test_snapshot_chat_with_the_sample_read(snap_compare, smollm2):
    assert snap_compare(SalaChat(Options(paths=[SAMPLE]), loaded=smollm2), terminal_size=(100, 28), run_before=settle)


def test_snapshot_session_list(snap_compare, smollm2, monkeypatch):
    from salachat.sessions import list_sessions
    from salachat.tui import screens

    _save_session(smollm2, "lighthouse")
    # the real catalogue, with the save time pinned so that the picture does not change every run
    monkeypatch.setattr(screens, "list_sessions", lambda root: [
        (name, {**manifest, "updated": "2026-11-23T12:00:00"} if manifest else None, error)
        for name, manifest, error in list_sessions(root)])

    async def open_list(pilot):
        await settle(pilot)
        await pilot.press("ctrl+o")
        await pilot.pause()

    assert snap_compare(SalaChat(Options(), loaded=smollm2), terminal_size=(100, 28), run_before=open_list)


def test_chat_command_refuses_bad_input_in_one_line_before_opening_the_window(salachat_cli):
    """Through the real entry point: help, a missing file (exit 3), no model installed (exit 4), a session
    that does not exist (exit 5): one line each, and the window never opens (it would hang without a tty)."""
    helped = salachat_cli("chat", "--help")
    assert helped.returncode == 0 and "Open the chat window" in helped.stdout
    missing = salachat_cli("chat", "missing.pdf", timeout=60)
    assert missing.returncode == 3 and missing.stderr.strip().count("\n") == 0 and "missing.pdf" in missing.stderr
    no_model = salachat_cli("chat", str(SAMPLE), env={"SALACHAT_TEST_MODEL": ""}, timeout=60)
    assert no_model.returncode == 4 and "salachat models pull smollm2" in no_model.stderr
    no_session = salachat_cli("resume", "nosuch", timeout=60)
    assert no_session.returncode == 5 and "Traceback" not in no_session.stderr
