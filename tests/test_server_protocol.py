"""The server's reading of OpenAI requests, in process (no model): what becomes the documents, the exchanges
and the question, and which requests are refused with which field named."""

import pytest
from salachat.engine.generate import Sampling

from salachat.server.protocol import ApiError, StopSequences, parse_request

DEFAULTS = Sampling(temperature=0.0, max_tokens=64)


def parse(messages, **fields):
    return parse_request({"model": "smollm2", "messages": messages, **fields}, DEFAULTS)


def test_a_documents_block_becomes_the_documents_and_the_rest_the_question():
    request = parse([{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "<documents>\nA </documents> inside.\n</documents>\n\nWho?"},
                     {"role": "assistant", "content": "Ada."},
                     {"role": "user", "content": "And then?"}])
    assert request.system_prompt == "Be brief."
    assert request.documents == "A </documents> inside."
    assert request.exchanges == [("Who?", "Ada.")]
    assert request.question == "And then?"


def test_messages_without_documents_and_with_text_parts():
    request = parse([{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
                     {"role": "user", "content": "three"}])
    assert request.documents == "" and request.system_prompt is None
    assert request.question == "one\ntwo\n\nthree"  # consecutive user messages are one turn
    assert request.exchanges == []


def test_sampling_fields_and_their_defaults():
    request = parse([{"role": "user", "content": "hi"}], temperature=0.5, top_p=0.9, max_completion_tokens=7,
                    seed=3, stop="END", stream=True, stream_options={"include_usage": True})
    assert (request.sampling.temperature, request.sampling.top_p, request.sampling.max_tokens,
            request.sampling.seed) == (0.5, 0.9, 7, 3)
    assert request.stop == ["END"] and request.stream and request.include_usage
    extras = parse([{"role": "user", "content": "hi"}], min_p=0.1, repetition_penalty=1.3)
    assert (extras.sampling.min_p, extras.sampling.repeat_penalty) == (0.1, 1.3)
    plain = parse([{"role": "user", "content": "hi"}])
    assert (plain.sampling.temperature, plain.sampling.max_tokens, plain.stream) == (0.0, 64, False)


def test_a_saved_session_is_named_by_model_or_field():
    assert parse([{"role": "user", "content": "hi"}], model="session:book").session == "book"
    assert parse([{"role": "user", "content": "hi"}], session="book").session == "book"


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"messages": []}, "messages", "non-empty"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", "start with a user"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages",
     "last message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"},
                   {"role": "user", "content": "z"}]}, "messages", "before the conversation"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages", "tool"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages", "image_url"),
    ({"temperature": 3}, "temperature", "between 0 and 2"),
    ({"max_tokens": 0}, "max_tokens", "at least 1"),
    ({"max_tokens": "many"}, "max_tokens", "an integer"),
    ({"n": 2}, "n", "n must be"),
    ({"top_p": 0}, "top_p", "above 0"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stream": "yes"}, "stream", "true or false"),
    ({"tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"model": ""}, "model", "model is required"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_requests_name_the_field(fields, param, words):
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], **fields}
    with pytest.raises(ApiError) as caught:
        parse_request(body, DEFAULTS)
    error = caught.value.to_dict()["error"]
    assert caught.value.status == 400 and error["param"] == param and words in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_stop_sequences_cut_before_the_first_even_across_pieces():
    stops = StopSequences(["STOP", "\n\n"])
    out = "".join(stops.push(piece) for piece in ["Hello wor", "ld ST", "OP and more"])
    assert out + stops.flush() == "Hello world " and stops.stopped
    free = StopSequences(["zzz"])
    out = "".join(free.push(piece) for piece in ["a", "zz", "b"])
    assert out + free.flush() == "azzb" and not free.stopped
