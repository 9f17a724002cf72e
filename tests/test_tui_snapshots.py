"""Snapshots of the chat window's main screens, with the real model (fixed size; nothing time-dependent)."""

from pathlib import Path

import pytest
from textual.widgets import Input

from salachat.tui.app import Options, SalaChat

SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "sample.pdf"
SIZE = (100, 28)


@pytest.fixture
def home(private_data_folder):
    """The test's own data folder (conftest keeps every test out of the real one)."""
    return private_data_folder


async def settle(pilot):
    await pilot.app.workers.wait_for_complete()
    # a blinking cursor would be drawn or not depending on when the picture is taken
    for box in pilot.app.query(Input):
        box.cursor_blink = False
    await pilot.pause()


def test_snapshot_empty_chat(snap_compare, smollm2):
    assert snap_compare(SalaChat(Options(), loaded=smollm2), terminal_size=SIZE, run_before=settle)


def test_snapshot_chat_with_the_sample_read(snap_compare, smollm2):
    assert snap_compare(SalaChat(Options(paths=[SAMPLE]), loaded=smollm2), terminal_size=SIZE, run_before=settle)


def test_snapshot_session_list(snap_compare, smollm2, monkeypatch):
    from test_tui_sessions import save_session

    from salachat.sessions import list_sessions
    from salachat.tui import screens

    save_session(smollm2, "lighthouse")
    # the real catalogue, with the save time pinned so that the picture does not change every run
    monkeypatch.setattr(screens, "list_sessions", lambda root: [
        (name, {**manifest, "updated": "2026-11-23T12:00:00"} if manifest else None, error)
        for name, manifest, error in list_sessions(root)])

    async def open_list(pilot):
        await settle(pilot)
        await pilot.press("ctrl+o")
        await pilot.pause()

    assert snap_compare(SalaChat(Options(), loaded=smollm2), terminal_size=SIZE, run_before=open_list)
