"""The chat window driven through Textual's pilot, with the real default model and the bundled sample PDF."""

import asyncio
import functools
import time
from pathlib import Path

import pytest
from textual import events

from salachat.tui.app import Answer, Options, SalaChat
from salachat.tui.screens import PassageScreen

SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "sample.pdf"
QUESTION = "Who kept the light for thirty-one years?"


def sync(test):
    """Run an async pilot test in its own event loop (no pytest-asyncio needed)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return run


@pytest.fixture
def home(private_data_folder):
    """The test's own data folder (conftest keeps every test out of the real one)."""
    return private_data_folder


@pytest.fixture
def slow_model(smollm2, monkeypatch):
    """The real model, 30 ms slower per forward pass: a key pressed mid-reading lands mid-reading."""
    forward = smollm2.model.forward

    def slower(*args, **kwargs):
        time.sleep(0.03)
        return forward(*args, **kwargs)

    monkeypatch.setattr(smollm2.model, "forward", slower)
    return smollm2


async def settle(pilot):
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def wait_until(pilot, condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await pilot.pause(0.01)


def press_without_waiting(app, key: str, character: str | None = None) -> None:
    """A key as the terminal driver delivers it; unlike pilot.press, this does not wait for the app to be
    idle, which would be after the whole answer."""
    app.post_message(events.Key(key, character))


def status(app) -> str:
    return str(app.query_one("#status").render())


def reading_label(app) -> str:
    return str(app.query_one("#read-label").render())


@sync
async def test_reads_the_document_with_progress_then_streams_an_answer(smollm2):
    app = SalaChat(Options(paths=[SAMPLE], max_tokens=12, chunk_size=128), loaded=smollm2)
    async with app.run_test(size=(110, 32)) as pilot:
        labels = []
        await wait_until(pilot, lambda: app.query_one("#reading").display)
        while app.query_one("#reading").display:  # what the user sees while the document is read
            labels.append(reading_label(app))
            await pilot.pause(0.005)
        await settle(pilot)
        total = app.conversation.document_tokens
        done = [int(label.split()[1].replace(",", "")) for label in labels]
        assert len(set(done)) >= 2 and done == sorted(done) and 0 < done[0] < total  # it advanced, in steps
        assert all(f"/ {total:,} tokens" in label and "tok/s" in label and "s left" in label for label in labels)
        assert app.conversation.tokens_in_context == total and "ask away" in status(app)
        assert "sample.pdf · 5 pages" in str(app.query_one("#docs").render())
        assert f"{total:,} tokens of" in str(app.query_one("#context").render())

        await pilot.click("#question")
        await pilot.press(*QUESTION)
        press_without_waiting(app, "enter", "\r")
        await wait_until(pilot, lambda: any(w.has_class("answer") for w in app.query(Answer)))
        answer = next(w for w in app.query(Answer) if w.has_class("answer"))
        shown = []
        while app.busy:  # what the answer shows while it is generated
            if answer.source and (not shown or shown[-1] != answer.source):
                shown.append(answer.source)
            await pilot.pause(0.005)
        await settle(pilot)
        final = app.conversation.turns[-1].answer
        assert final.strip() and answer.source == final
        assert len(shown) >= 3 and all(final.startswith(part) for part in shown)  # streamed, piece by piece
        assert shown[0] != final
        assert app.conversation.turns[-1].stats["generated_tokens"] <= 12
        assert "answered" in status(app)
        await pilot.press("up")
        assert app.query_one("#question").value == QUESTION  # history
        await pilot.press("down")
        assert app.query_one("#question").value == ""


@sync
async def test_escape_stops_the_reading_between_chunks_and_keeps_what_was_read(slow_model):
    app = SalaChat(Options(paths=[SAMPLE], chunk_size=16), loaded=slow_model)
    async with app.run_test() as pilot:
        await wait_until(pilot, lambda: app.query_one("#reading").display)
        await pilot.press("escape")
        await settle(pilot)
        kept = app.conversation.tokens_in_context
        assert 0 < kept < app.conversation.document_tokens and app.conversation.pending_ids
        assert kept % 16 == 0  # stopped between chunks
        assert f"reading stopped at {kept:,} tokens" in status(app) and not app.query_one("#reading").display


@sync
async def test_a_stopped_reading_is_saved_in_the_session_and_resumed_when_it_is_opened(slow_model, home):
    from salachat.sessions import read_manifest

    app = SalaChat(Options(paths=[SAMPLE], session="notes", chunk_size=16), loaded=slow_model)
    async with app.run_test() as pilot:
        await wait_until(pilot, lambda: app.query_one("#reading").display)
        await pilot.press("escape")
        await settle(pilot)
        kept, total = app.conversation.tokens_in_context, app.conversation.document_tokens
        assert "`salachat resume notes` continues" in status(app)
    assert 0 < kept < total and read_manifest(home / "sessions" / "notes")["tokens"] == kept

    again = SalaChat(Options(session="notes", chunk_size=128), loaded=slow_model)
    async with again.run_test() as pilot:
        await wait_until(pilot, lambda: again.query_one("#reading").display)
        assert int(reading_label(again).split()[1].replace(",", "")) > kept  # it goes on from where it stopped
        await settle(pilot)
        assert again.conversation.tokens_in_context == total and not again.conversation.pending_ids
        assert again.sub_title == "notes" and "ask away" in status(again)
    assert read_manifest(home / "sessions" / "notes")["tokens"] == total


@sync
async def test_escape_stops_a_generation(slow_model):
    app = SalaChat(Options(max_tokens=200), loaded=slow_model)
    async with app.run_test() as pilot:
        await settle(pilot)
        app.query_one("#question").value = "Tell me a long story about a lighthouse."
        press_without_waiting(app, "enter", "\r")
        await wait_until(pilot, lambda: any(w.has_class("answer") and w.source for w in app.query(Answer)))
        await pilot.press("escape")
        await settle(pilot)
        turn = app.conversation.turns[-1]
        assert turn.stats["stopped_by"] == "cancelled" and turn.stats["generated_tokens"] < 50
        assert "answered (stopped)" in status(app)
        [answer] = [w for w in app.query(Answer) if w.has_class("answer")]
        assert answer.source == turn.answer  # what was generated stays on screen


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
        await pilot.press("escape")
        assert not isinstance(app.screen, PassageScreen)


@sync
async def test_a_missing_model_is_one_line_in_the_window():
    app = SalaChat(Options(model="/nonexistent/model.gguf", device="cpu"))
    async with app.run_test() as pilot:
        await settle(pilot)
        text = status(app)
        assert "model.gguf" in text and "Traceback" not in text and "\n" not in text.strip()
        app.query_one("#question").value = "hello?"
        await pilot.press("enter")
        await settle(pilot)
        assert "no model loaded" in status(app)  # the window stays usable


@sync
async def test_an_unreadable_document_is_one_line_in_the_window(smollm2, tmp_path):
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7 this is not a pdf")
    app = SalaChat(Options(paths=[broken]), loaded=smollm2)
    async with app.run_test() as pilot:
        await settle(pilot)
        text = status(app)
        assert "broken.pdf: is damaged or not a valid PDF" in text and "Traceback" not in text


@sync
async def test_quitting_while_reading_stops_between_chunks_and_keeps_the_session(slow_model, home):
    from salachat.sessions import read_manifest

    app = SalaChat(Options(paths=[SAMPLE], session="quit", chunk_size=16), loaded=slow_model)
    async with app.run_test() as pilot:
        await wait_until(pilot, lambda: app.query_one("#reading").display)
        await pilot.press("ctrl+q")
        await pilot.pause()
    kept = app.conversation.tokens_in_context
    assert 0 < kept < app.conversation.document_tokens and app.return_code == 0
    assert read_manifest(home / "sessions" / "quit")["tokens"] == kept
