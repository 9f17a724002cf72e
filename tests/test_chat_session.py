"""The product's use-cases in process, through ChatSession: read with progress, ask, save, resume, stop and
continue, Ctrl-C before the first save, fork, the long-context switch, stdin and the system prompt.
The tiny MiniCPM-SALA checkpoint (tests/sala_tiny.py) keeps them quick; the default model's answers are
tested through the command line (test_cli.py)."""

import dataclasses
import sys
from pathlib import Path

import pytest
from salachat.engine.generate import Cancelled, Sampling, Stats

from salachat import errors
from salachat.chat import ChatSession

sys.path.insert(0, str(Path(__file__).parent))

STORY = ("The harbour light of Varna Point was built in 1871. Tomas Brandt kept the light for thirty-one years. "
         "His daughter Ilse wrote the log in green ink. The lamp burned whale oil until 1903.\n")
GREEDY = Sampling(max_tokens=6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch
    from sala_tiny import write_tiny_checkpoint
    from salachat.engine.loader import load_model

    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("sala") / "tiny")
    return load_model(str(folder), device="cpu", dtype=torch.float32)


@pytest.fixture
def story(tmp_path):
    path = tmp_path / "light.txt"
    path.write_text(STORY)
    return path


def test_read_with_progress_then_ask_streams_and_counts(tiny, story):
    chat = ChatSession.open(paths=[story], loaded=tiny, chunk_size=64)
    total = chat.pending_tokens
    assert total > 200 and chat.context().tokens == 0 and chat.context().long_context == "native"
    seen = []
    chat.read(progress=lambda done, all_tokens, _s: seen.append((done, all_tokens)))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1] == (total, total) and len(seen) > 2
    stats = Stats()
    pieces = list(chat.ask("Who kept the light?", GREEDY, stats=stats))
    assert pieces and 0 < stats.generated_tokens <= GREEDY.max_tokens and stats.prompt_tokens > 0
    assert chat.turns[-1].answer == "".join(pieces) and chat.context().tokens > total
    assert str(chat.document_lines[0]).startswith("light.txt · ")


def test_a_saved_session_resumes_exactly_where_it_was(tiny, story):
    chat = ChatSession.open(paths=[story], loaded=tiny, session="light", chunk_size=64)
    first, _ = chat.answer("Who kept the light?", GREEDY)
    twin = chat.fork()  # the same conversation, kept in memory
    resumed = ChatSession.resume("light", loaded=tiny)
    assert [t.question for t in resumed.turns] == ["Who kept the light?"] and resumed.turns[0].answer == first
    assert resumed.context().tokens == chat.context().tokens and resumed.session_name == "light"
    again, _ = resumed.answer("When was it built?", GREEDY)
    expected, _ = twin.answer("When was it built?", GREEDY)
    assert again == expected  # resuming from disk continues exactly as the live conversation does
    assert ChatSession.resume("light", loaded=tiny).turns[-1].answer == again  # saved after the answer


def test_a_fork_is_independent_of_its_parent(tiny, story):
    chat = ChatSession.open(paths=[story], loaded=tiny, chunk_size=64)
    chat.read()
    before = chat.context().tokens
    fork = chat.fork()
    fork.answer("Who?", GREEDY)
    assert chat.context().tokens == before and not chat.turns
    assert fork.context().tokens > before and len(fork.turns) == 1 and fork.session_name is None
    fork.save_as("forked")
    assert ChatSession.resume("forked", loaded=tiny).turns[0].question == "Who?"
    from salachat.sessions import SessionError

    with pytest.raises(SessionError, match="exists already"):
        chat.fork().save_as("forked")


def test_a_stopped_reading_is_saved_and_continues_on_resume(tiny, story):
    chat = ChatSession.open(paths=[story], loaded=tiny, session="stopped", chunk_size=32)
    total = chat.pending_tokens
    chunks = []
    with pytest.raises(Cancelled):
        chat.read(progress=lambda done, *_: chunks.append(done), should_stop=lambda: len(chunks) >= 3)
    assert chat.saved_tokens == chat.context().tokens == 96 and chat.pending_tokens == total - 96
    del chat
    resumed = ChatSession.resume("stopped", loaded=tiny)
    assert resumed.pending_tokens == total - 96
    resumed.read()
    straight = ChatSession.open(paths=[story], loaded=tiny, chunk_size=32)
    straight.read()
    assert resumed.context().tokens == straight.context().tokens == total
    assert resumed.answer("Who?", GREEDY)[0] == straight.answer("Who?", GREEDY)[0]


def test_ctrl_c_before_the_first_save_keeps_nothing_and_says_so(tiny, story, private_data_folder, monkeypatch):
    chat = ChatSession.open(paths=[story], loaded=tiny, session="early", chunk_size=32)

    def interrupt(*_args, **_kwargs):  # Ctrl-C inside the first chunk, before its checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny.model, "forward", interrupt)
    with pytest.raises(errors.Interrupted) as stopped:
        chat.read()
    message = str(stopped.value)
    assert "nothing was kept" in message and "salachat resume" not in message
    assert stopped.value.code == errors.INTERRUPTED
    assert not (private_data_folder / "sessions" / "early").exists()  # no session left to fail on resume


def test_ctrl_c_after_a_checkpoint_names_the_resume_command(tiny, story):
    chat = ChatSession.open(paths=[story], loaded=tiny, session="later", chunk_size=32)
    with pytest.raises(Cancelled):
        chat.read(should_stop=lambda: chat.context().tokens >= 64)

    def interrupt(*_):
        raise KeyboardInterrupt

    with pytest.raises(errors.Interrupted, match="salachat resume later"):
        chat.read(progress=interrupt)


def test_a_session_of_other_documents_is_refused(tiny, story, tmp_path):
    from salachat.sessions import SessionError

    ChatSession.open(paths=[story], loaded=tiny, session="mine", chunk_size=64).answer("Who?", GREEDY)
    other = tmp_path / "other.txt"
    other.write_text(STORY.replace("1871", "1902"))
    with pytest.raises(SessionError, match="holds other documents"):
        ChatSession.open(paths=[other], loaded=tiny, session="mine")
    again = ChatSession.open(paths=[story], loaded=tiny, session="mine")
    assert len(again.turns) == 1 and not again.pending_tokens  # the same documents continue it


def test_stdin_text_and_the_system_prompt(tiny):
    chat = ChatSession.open(text=STORY.encode(), loaded=tiny, system_prompt="Answer in one word.",
                            session="piped")
    assert chat.documents.docs[0].source == "stdin" and str(chat.document_lines[0]).startswith("stdin · ")
    chat.answer("Who?", GREEDY)
    resumed = ChatSession.resume("piped", loaded=tiny)
    assert resumed.conversation.system_prompt == "Answer in one word."
    assert resumed.manifest_documents[0]["source"] == "stdin"


def test_the_long_context_extension_turns_on_only_when_the_documents_do_not_fit(smollm2):
    """A dense model told it was trained on 256 tokens: a short document reads densely, a long one with the
    extension, saying so once; long_context="off" refuses instead."""
    from salachat.conversation import ContextTooLong

    trained = smollm2.model.args
    smollm2.model.args = dataclasses.replace(trained, max_position_embeddings=256)
    try:
        notes = []
        short = ChatSession.open(text=b"The keeper was Tomas Brandt.", loaded=smollm2, on_note=notes.append)
        assert short.context().long_context == "dense" and short.context().limit == 256 and not notes
        long_text = ("A line of the book about the harbour light. " * 20).encode()
        long = ChatSession.open(text=long_text, loaded=smollm2, on_note=notes.append, chunk_size=128)
        assert long.context().long_context == "extended" and long.context().limit is None
        assert len(notes) == 1 and "long-context extension" in notes[0] and long.notes == notes
        assert smollm2.long_context == "dense"  # the shared model itself is left as it was
        assert ", past the model's trained 256" in notes[0]  # the documents alone are past it
        notes.clear()  # documents that fit, but not with room for an answer: said so, not "past"
        near = ChatSession.open(text=("A line. " * 16).encode(), loaded=smollm2, on_note=notes.append)
        assert near.context().long_context == "extended" and len(notes) == 1, notes
        assert "with room for an answer, past the model's trained 256" in notes[0]
        long.read()
        assert long.context().tokens > 256
        with pytest.raises(ContextTooLong):
            ChatSession.open(text=long_text, loaded=smollm2, long_context="off")
        forced = ChatSession.open(text=b"The keeper was Tomas Brandt.", loaded=smollm2, long_context="on")
        assert forced.context().long_context == "extended"
    finally:
        smollm2.model.args = trained


def test_ctrl_c_inside_an_answer_never_saves_that_state(tiny, story, monkeypatch):
    chat = ChatSession.open(paths=[story], loaded=tiny, session="answering", chunk_size=64)
    chat.answer("Who?", GREEDY)
    saved = chat.saved_tokens
    forward = tiny.model.forward
    calls = []

    def interrupted_forward(*args, **kwargs):  # Ctrl-C in the middle of the second answer's decoding
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny.model, "forward", interrupted_forward)
    with pytest.raises(errors.Interrupted, match="not saved; session 'answering' keeps its last save"):
        chat.answer("And when?", GREEDY)
    monkeypatch.setattr(tiny.model, "forward", forward)
    resumed = ChatSession.resume("answering", loaded=tiny)
    assert resumed.context().tokens == saved and [t.question for t in resumed.turns] == ["Who?"]
