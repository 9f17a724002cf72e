"""A question's words pick the document blocks its answer reads past a dense model's trained length
(engine/focus.py), on real prose (the standard library's docstrings) with the default model's tokenizer, and
through ChatSession: the passage goes before the question, the long-context layers attend its blocks, and a
saved session resumes with it."""

import dataclasses
import random
import sys
from pathlib import Path

import pytest
import torch
from salachat.engine.focus import quote, rank_blocks, term_ids
from salachat.engine.generate import Sampling
from salachat.engine.long_context import LongContextCache

from salachat.chat import ChatSession
from salachat.conversation import QUOTE_HEADER

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import longdoc

BLOCK = 128


@pytest.fixture(scope="module")
def paragraphs():
    return longdoc.stdlib_paragraphs(limit_chars=400_000)


@pytest.mark.parametrize("length", [16384, 65536])
def test_the_passkey_span_ranks_first_in_real_prose(smollm2, paragraphs, length):
    tok = smollm2.tokenizer
    fold = term_ids(tok)
    rng = random.Random(length)
    for depth in (10, 50, 90):
        key = str(rng.randint(10000, 99999))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        text = longdoc.haystack(paragraphs, tok, length, [(depth / 100, needle)], offset=rng.randrange(100))
        ids = tok.encode(text)
        blocks = rank_blocks(ids, tok.encode(longdoc.PASSKEY_QUESTION), fold, BLOCK, 1, skip_blocks=1)
        assert 1 <= len(blocks) <= 2 and blocks[-1] - blocks[0] == len(blocks) - 1, (depth, blocks)
        passage = tok.decode(ids[min(blocks) * BLOCK : (max(blocks) + 1) * BLOCK])
        assert key in passage


def test_the_asked_label_wins_over_the_other_keys(smollm2, paragraphs):
    tok = smollm2.tokenizer
    fold = term_ids(tok)
    rng = random.Random(5)
    keys = {label: str(rng.randint(10000, 99999)) for label in longdoc.LABELS}
    needles = [(d / 100, f"The pass key of the {label} box is {keys[label]}.")
               for d, label in zip((20, 40, 60, 80), longdoc.LABELS)]
    ids = tok.encode(longdoc.haystack(paragraphs, tok, 32768, needles, offset=7))
    for label in longdoc.LABELS:
        question = f"What is the pass key of the {label} box? Answer with the number only."
        blocks = rank_blocks(ids, tok.encode(question), fold, BLOCK, 1, skip_blocks=1)
        passage = tok.decode(ids[min(blocks) * BLOCK : (max(blocks) + 1) * BLOCK])
        assert f"{label} box is {keys[label]}" in passage
        others = [k for other, k in keys.items() if other != label]
        assert not any(k in passage for k in others)


def test_terms_fold_case_and_the_leading_space_and_skip_what_is_no_word(smollm2):
    tok = smollm2.tokenizer
    fold = term_ids(tok)
    same = {int(fold[tok.encode(w)[0]]) for w in (" key", " Key", "key", " KEY")}
    assert len(same) == 1 and same != {-1}
    assert int(fold[tok.encode(".")[0]]) == -1 and int(fold[tok.encode(" a")[0]]) == -1


def test_no_shared_word_and_the_skipped_blocks_give_nothing(smollm2, paragraphs):
    tok = smollm2.tokenizer
    fold = term_ids(tok)
    ids = tok.encode("\n\n".join(paragraphs[:200]))[: 20 * BLOCK]
    assert rank_blocks(ids, tok.encode("Zyxqvbw?"), fold, BLOCK, 2) == []
    head = tok.decode(ids[:BLOCK]).split()
    word = max(head, key=len)  # a word of the first block
    found = rank_blocks(ids, tok.encode(word), fold, BLOCK, 3, skip_blocks=1)
    assert 0 not in found
    assert rank_blocks(ids[:BLOCK], tok.encode(word), fold, BLOCK, 3, skip_blocks=1) == []
    assert rank_blocks(ids, tok.encode(word), fold, BLOCK, 0) == []


def _session(smollm2, paragraphs, key, name=None):
    text = longdoc.haystack(paragraphs, smollm2.tokenizer, 1400,
                            [(0.2, f"The pass key is {key}. Remember it. {key} is the pass key.")])
    return ChatSession.open(text=text.encode(), loaded=smollm2, session=name, chunk_size=256)


def test_past_the_trained_length_the_passage_goes_before_the_question_and_resumes(smollm2, paragraphs):
    """The default model told it was trained on 256 tokens (blocks of 32, a 128-token window): a question
    asked after 1,400 tokens gets the passage its words point at placed before it, its answer's queries
    attend those blocks, and the resumed session continues exactly as the live one."""
    trained = smollm2.model.args
    smollm2.model.args = dataclasses.replace(trained, max_position_embeddings=256)
    greedy = Sampling(max_tokens=4, temperature=0.0)
    try:
        chat = _session(smollm2, paragraphs, "40817", name="keys")
        assert chat.context().long_context == "extended"
        answer, _ = chat.answer(longdoc.PASSKEY_QUESTION, greedy)
        turn = chat.turns[0]
        assert "The pass key is 40817" in turn.quoted and turn.question == longdoc.PASSKEY_QUESTION
        assert f"{QUOTE_HEADER}\n{turn.quoted}\n\n{longdoc.PASSKEY_QUESTION}" in chat.conversation.fed_text
        layers = [layer for layer in chat.conversation.cache.layers if isinstance(layer, LongContextCache)]
        focus = layers[0].focus.tolist()
        assert focus and all(torch.equal(layer.focus, layers[0].focus) for layer in layers)
        assert layers[0].focus_from > 1400 - 64  # set where the question begins, after the reading
        ids = chat.conversation.reading_ids()
        assert "40817" in smollm2.tokenizer.decode(ids[min(focus) * 32 : (max(focus) + 1) * 32].tolist())

        twin = chat.fork()
        notes = []
        resumed = ChatSession.resume("keys", loaded=smollm2, on_note=notes.append)
        assert len(notes) == 1 and notes[0].startswith("session 'keys' was read with the long-context extension (")
        assert notes[0].endswith(" tokens of documents, past the model's trained 256): answering with it")
        assert resumed.notes == notes  # the chat window's log shows them
        assert resumed.turns[0].quoted == turn.quoted and resumed.turns[0].answer == answer
        follow_up = "Which key was it again?"
        again, _ = resumed.answer(follow_up, greedy)
        expected, _ = twin.answer(follow_up, greedy)
        assert again == expected and resumed.conversation.fed_text == twin.conversation.fed_text

        unrelated = _session(smollm2, paragraphs, "11111")
        unrelated.answer("Zyxqvbw?", greedy)
        assert unrelated.turns[0].quoted == ""
    finally:
        smollm2.model.args = trained


def test_inside_the_trained_length_nothing_is_quoted(smollm2, paragraphs):
    forced = _session(smollm2, paragraphs, "52525")  # 1,400 tokens: dense for the default model
    assert forced.context().long_context == "dense"
    on = ChatSession.open(text=b"The pass key is 52525.", loaded=smollm2, long_context="on")
    on.answer(longdoc.PASSKEY_QUESTION, Sampling(max_tokens=2))
    assert on.turns[0].quoted == "" and "From the documents" not in on.conversation.fed_text


def test_the_quote_is_the_paragraph_of_the_line_that_matches_the_question(paragraphs):
    rng = random.Random(7)
    for _ in range(20):
        start = rng.randrange(len(paragraphs) - 6)
        before, after = paragraphs[start : start + 3], paragraphs[start + 3 : start + 6]
        needle = f"The pass key of the blue box is {rng.randint(10000, 99999)}."
        # the blocks begin mid-paragraph: the quote must not start with what precedes the matching line
        passage = "\n\n".join([before[0][len(before[0]) // 2 :], *before[1:], needle, *after])
        assert quote(passage, "What is the pass key of the blue box? Answer with the number only.") == needle


def test_a_quote_reaches_a_few_lines_around_its_line_and_a_heading_brings_its_paragraph():
    manual = "\n".join(f"line {i} of the description" for i in range(12))
    lines = manual.split("\n")
    lines[6] = "Searches for an element called name starting from pointer."
    got = quote("\n".join(lines), "Which function searches for an element called name?")
    assert got == "\n".join(lines[2:11])  # four lines either side, within one paragraph
    heading = "Intro text here.\n\n4.5 Trademarks\n\nNo rights to any marks are granted.\nMore.\n\nNext part."
    assert quote(heading, "Tell me about trademarks") == "4.5 Trademarks\n\nNo rights to any marks are granted.\nMore."
    assert quote("Nothing in common.\nAt all.", "What is the pass key?") == "Nothing in common.\nAt all."
