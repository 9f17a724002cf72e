"""The tokenizer built from the GGUF vocabulary round-trips and matches an independent tokenisation."""

import inspect
import json
import textwrap

import pytest

from salachat.engine.gguf_file import GGUFFile
from salachat.engine.tokenizer import StreamDecoder, Tokenizer


def real_strings() -> list[str]:
    """A few hundred lines nobody here wrote: the standard library's own source and docstrings."""
    import argparse
    import email.message
    import http.client
    import this  # noqa: F401  (its text, rot13-decoded, is in `this.s`)
    import unicodedata

    lines = []
    for module in (json, textwrap, argparse, http.client, email.message):
        lines += [line for line in inspect.getsource(module).splitlines() if line.strip()][:80]
    lines += [chr(c) + " " + unicodedata.name(chr(c), "") for c in range(0xC0, 0x180, 3)]
    lines += ["Größe 12,5 cm — naïve café", "日本語のテキスト 2026年", "emoji 🙂 and\ttabs\r\nCRLF", "1234567890 3.14159"]
    return lines


@pytest.fixture(scope="module")
def ours(smollm2_path):
    return Tokenizer.from_gguf_metadata(GGUFFile.open(smollm2_path).metadata)


def test_round_trip_on_real_strings(ours):
    strings = real_strings()
    assert len(strings) >= 300
    for s in strings:
        assert ours.decode(ours.encode(s)) == s


def test_matches_reference_tokenisation_on_real_strings(ours, smollm2_path):
    """Reference: transformers' own GGUF→tokenizers conversion (vocab and merges read independently).

    transformers ignores GGUF's `tokenizer.ggml.pre`; SmolLM2's published tokenizer.json splits digits one by
    one before the byte-level regex ("smollm" in llama.cpp), so the reference gets that documented
    pre-tokenizer set explicitly. Strings without digits are also compared against the unmodified conversion.
    """
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers

    reference = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    backend = reference.backend_tokenizer
    digitless = [s for s in real_strings() if not any(ch.isdigit() for ch in s)]
    for s in digitless:
        assert ours.encode(s) == backend.encode(s, add_special_tokens=False).ids, s
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for s in real_strings():
        assert ours.encode(s) == backend.encode(s, add_special_tokens=False).ids, s


def test_special_tokens_are_atomic_and_stop_generation(ours):
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == ours.backend.token_to_id("<|im_start|>")
    assert ours.backend.token_to_id("<|im_end|>") in ids
    assert ours.backend.token_to_id("<|im_end|>") in ours.stop_ids


def test_chat_template_comes_from_the_gguf(ours):
    text = ours.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


def test_stream_decoder_never_splits_a_character(ours):
    text = "naïve 日本語 🙂 done"
    decoder = StreamDecoder(ours)
    pieces = [decoder.push(i) for i in ours.encode(text)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
