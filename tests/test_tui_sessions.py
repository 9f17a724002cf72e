"""The session list of the chat window (open, rename, delete), over sessions saved by the real SessionWriter."""

import asyncio
from pathlib import Path

import pytest

from salachat.sessions import SessionError, rename_session
from salachat.tui.app import Options, SalaChat
from salachat.tui.screens import SessionsScreen

SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "sample.pdf"


@pytest.fixture
def home(private_data_folder):
    """The test's own data folder (conftest keeps every test out of the real one)."""
    return private_data_folder


def save_session(loaded, name: str) -> int:
    """A session as `salachat ask --session NAME` leaves it: the sample read, saved."""
    from salachat.conversation import Conversation
    from salachat.documents import load_documents
    from salachat.paths import sessions_dir
    from salachat.sessions import SessionWriter

    documents = load_documents([SAMPLE])
    conversation = Conversation(loaded)
    conversation.set_documents(documents.prompt_text)
    conversation.read()
    SessionWriter(sessions_dir() / name, documents=documents.summary()).save(conversation)
    return conversation.tokens_in_context


async def settle(pilot):
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


def test_session_list_deletes_renames_and_opens_a_saved_session(smollm2, home):
    tokens = save_session(smollm2, "lighthouse")
    save_session(smollm2, "scratch")

    async def drive():
        app = SalaChat(Options(), loaded=smollm2)
        async with app.run_test(size=(110, 32)) as pilot:
            await settle(pilot)
            await pilot.press("ctrl+o")
            assert isinstance(app.screen, SessionsScreen)
            table = app.screen.query_one("#sessions-table")
            names = [str(table.get_row_at(i)[0]) for i in range(table.row_count)]
            assert sorted(names) == ["lighthouse", "scratch"]
            await pilot.press(*["down"] * names.index("scratch"), "d")
            assert not (home / "sessions" / "scratch").exists() and table.row_count == 1
            await pilot.press("r")
            await pilot.press(*["backspace"] * len("lighthouse"), *"keeper", "enter")
            assert (home / "sessions" / "keeper").is_dir() and not (home / "sessions" / "lighthouse").exists()
            assert str(table.get_row_at(0)[0]) == "keeper"
            await pilot.press("enter")  # open it
            await settle(pilot)
            assert not isinstance(app.screen, SessionsScreen)
            assert app.conversation.tokens_in_context == tokens and app.sub_title == "keeper"
            assert "session keeper: ready" in str(app.query_one("#status").render())
            assert "sample.pdf · 5 pages" in str(app.query_one("#docs").render())

    asyncio.run(drive())


def test_rename_session_moves_the_folder_and_refuses_clashes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert rename_session(tmp_path, "a", "c") == tmp_path / "c" and (tmp_path / "c").is_dir()
    assert not (tmp_path / "a").exists()
    with pytest.raises(SessionError, match="exists already"):
        rename_session(tmp_path, "c", "b")
    with pytest.raises(SessionError, match="no session named 'a'"):
        rename_session(tmp_path, "a", "d")
    with pytest.raises(SessionError):
        rename_session(tmp_path, "c", "../escape")
