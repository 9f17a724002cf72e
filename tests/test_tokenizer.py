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


def _with_pre(smollm2_path, pre: str) -> Tokenizer:
    """SmolLM2's real vocabulary and merges, split by another family's pre-tokenizer."""
    meta = dict(GGUFFile.open(smollm2_path).metadata)
    meta["tokenizer.ggml.pre"] = pre
    return Tokenizer.from_gguf_metadata(meta)


def test_qwen2_pre_tokenizer_matches_transformers_qwen2_tokenizer(smollm2_path):
    """Reference: transformers' Qwen2Tokenizer, which builds its own split regex, fed the same vocabulary."""
    transformers = pytest.importorskip("transformers")
    meta = GGUFFile.open(smollm2_path).metadata
    tokens = meta["tokenizer.ggml.tokens"]
    reference = transformers.Qwen2Tokenizer(vocab={t: i for i, t in enumerate(tokens)},
                                            merges=[tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]])
    ours = _with_pre(smollm2_path, "qwen2")
    for s in real_strings():
        assert ours.encode(s) == reference.encode(s, add_special_tokens=False), s


def _long_real_text() -> str:
    import argparse
    import email.message
    import http.client

    return "\n".join(inspect.getsource(m) for m in (json, textwrap, argparse, http.client, email.message)) + (
        "\n".join(real_strings()))


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2"])
def test_encode_long_equals_whole_text_encoding(smollm2_path, pre):
    tokenizer = _with_pre(smollm2_path, pre) if pre != "smollm" else Tokenizer.from_gguf_metadata(
        GGUFFile.open(smollm2_path).metadata)
    text = _long_real_text()
    assert tokenizer.splits_safely
    whole = tokenizer.backend.encode(text, add_special_tokens=False).ids
    assert tokenizer.encode_long(text, piece_chars=997) == whole  # hundreds of cuts
    assert tokenizer.encode(text * 2) == tokenizer.backend.encode(text * 2, add_special_tokens=False).ids


def test_encode_of_a_million_tokens_has_bounded_memory(smollm2_path, tmp_path):
    """In a fresh process: peak memory while encoding about a million tokens of real text, beyond the text
    and the ids themselves (whole-text encoding costs about 600 bytes per token)."""
    import subprocess
    import sys

    script = f"""
import resource, inspect, json, textwrap, argparse
from salachat.engine.gguf_file import GGUFFile
from salachat.engine.tokenizer import Tokenizer
tokenizer = Tokenizer.from_gguf_metadata(GGUFFile.open({str(smollm2_path)!r}).metadata)
base = "\\n".join(inspect.getsource(m) for m in (json, textwrap, argparse))
text = base * (4_400_000 // len(base))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ids = tokenizer.encode(text)
print(len(ids), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True)
    n_ids, grown = map(int, result.stdout.split())
    assert n_ids > 900_000
    assert grown / n_ids < 100, f"{grown / n_ids:.0f} bytes per token"


def _sentencepiece_gguf(path) -> None:
    """A llama.cpp "llama" (SentencePiece) vocabulary grown from real text: byte fallback tokens, the
    characters, and every prefix of the 300 commonest "▁word" pieces, scored by rank."""
    import collections
    import re

    import gguf
    import numpy as np

    text = "\n".join(inspect.getsource(m) for m in (json, textwrap))
    words = collections.Counter(re.findall(r"\w+", text))
    vocab = sorted({c for w in words for c in w} | {"▁"})
    for word, _ in words.most_common(300):
        piece = "▁" + word
        vocab += [piece[:i] for i in range(2, len(piece) + 1) if piece[:i] not in vocab]
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *vocab]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(vocab))])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(vocab))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    for add in (writer.add_block_count, writer.add_context_length, writer.add_embedding_length,
                writer.add_feed_forward_length, writer.add_head_count):
        add(64 if add != writer.add_block_count else 1)
    writer.add_tensor("token_embd.weight", np.zeros((len(pieces), 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_sentencepiece_gguf_vocabulary_matches_transformers(tmp_path):
    """Reference: transformers' own GGUF → tokenizers conversion of the same file. One documented difference:
    a text that starts with whitespace gets the "▁" prefix from us as from llama.cpp and SentencePiece's
    add_dummy_prefix, where transformers' conversion (Metaspace, prepend_scheme="first") omits it."""
    transformers = pytest.importorskip("transformers")
    _sentencepiece_gguf(tmp_path / "spm.gguf")
    ours = Tokenizer.from_gguf_metadata(GGUFFile.open(tmp_path / "spm.gguf").metadata)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    strings = real_strings()
    compared = [s for s in strings if not s[:1].isspace()]
    assert len(compared) > 150
    for s in compared:
        assert ours.encode(s) == reference.encode(s, add_special_tokens=False), s
    for s in strings:
        assert ours.decode(ours.encode(s)) == s
    assert not ours.splits_safely  # each piece would get its own "▁": long texts are encoded whole
