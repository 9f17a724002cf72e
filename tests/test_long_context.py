"""The long-context extension with the real default model: the dense model inside the trained length, no
query-key distance past it, bit-exact resume, and a passkey found at 16K tokens of real prose."""

import dataclasses
import random
import sys
from pathlib import Path

import pytest
import torch
from salachat.engine import long_context
from salachat.engine.cache import ModelCache
from salachat.engine.generate import prefill
from salachat.engine.long_context import LongContextCache, LongContextParams

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import longdoc

# small geometry so a few hundred tokens exercise every part: dense prefix, window, selected blocks
SMALL = LongContextParams(block_size=32, window=64, init_blocks=1, topk=2, dense_len=128)


@pytest.fixture(scope="module")
def prose_ids(smollm2):
    text = "\n\n".join(longdoc.stdlib_paragraphs(limit_chars=20_000))
    return smollm2.tokenizer.encode(text)[:700]


def test_inside_the_trained_length_the_extension_is_the_dense_model(smollm2, prose_ids):
    ids = prose_ids[:600]
    dense_cache = smollm2.model.new_cache()
    dense = prefill(smollm2.model, ids, dense_cache, chunk_size=128)
    cache = smollm2.model.new_cache(sparse=long_context.params_for(smollm2.model))
    extended = prefill(smollm2.model, ids, cache, chunk_size=128)
    assert all(isinstance(layer, LongContextCache) for layer in cache.layers)
    assert torch.equal(dense, extended)
    token = torch.tensor([int(dense.argmax())])
    assert torch.equal(smollm2.model(token, dense_cache), smollm2.model(token, cache))


def test_the_local_part_keeps_true_relative_positions(smollm2, prose_ids):
    # no dense prefix, a window wider than the text: every key sits in the local span, rotated relative to
    # the span's start instead of to 0, which is the same attention up to rounding
    params = dataclasses.replace(SMALL, window=1024, dense_len=0)
    ids = torch.tensor(prose_ids[:300])
    dense = smollm2.model(ids, smollm2.model.new_cache())
    extended = smollm2.model(ids, smollm2.model.new_cache(sparse=params))
    assert (dense - extended).abs().max().item() < 1e-3


def test_past_dense_len_no_query_key_distance_exceeds_the_memory_distance(smollm2, prose_ids):
    asked = []
    rotary = smollm2.model.rotary
    original = rotary.cos_sin

    def recording(positions):
        asked.append(int(positions.max()))
        return original(positions)

    ids = torch.tensor(prose_ids)
    cache = smollm2.model.new_cache(sparse=SMALL)
    rotary.cos_sin = recording
    try:
        for begin in range(0, len(ids), 100):
            smollm2.model(ids[begin : begin + 100], cache)
    finally:
        rotary.cos_sin = original
    # the model rotates its own chunk positions once a chunk (unused by these caches); the caches ask for
    # the dense prefix's positions and the table of relative distances, never beyond
    own = set(range(99, len(ids), 100)) | {len(ids) - 1}
    cache_asks = [p for p in asked if p not in own]
    assert max(cache_asks) == max(SMALL.dense_len - 1, SMALL.memory_distance)
    layer = cache.layers[0]
    assert layer.length == len(ids) and layer.state()["rotated"].shape[1] == SMALL.dense_len


def test_past_dense_len_the_output_differs_from_dense_only_there(smollm2, prose_ids):
    ids = torch.tensor(prose_ids[:400])
    dense = smollm2.model(ids, smollm2.model.new_cache())
    extended = smollm2.model(ids, smollm2.model.new_cache(sparse=SMALL))
    assert torch.equal(dense[: SMALL.dense_len], extended[: SMALL.dense_len])
    assert (dense[-100:] - extended[-100:]).abs().max().item() > 1e-2  # blocks really are left out
    assert torch.isfinite(extended).all()


def test_a_restored_cache_gives_identical_next_logits(smollm2, prose_ids):
    ids = prose_ids[:650]
    cache = smollm2.model.new_cache(sparse=SMALL)
    prefill(smollm2.model, ids[:600], cache, chunk_size=97)
    tensors, meta = cache.state()
    restored = ModelCache.from_state({k: v.clone() for k, v in tensors.items()}, meta)
    assert meta["layers"][0]["kind"] == "long_context_kv" and meta["layers"][0]["window"] == SMALL.window
    rest = torch.tensor(ids[600:])
    assert torch.equal(smollm2.model(rest, cache), smollm2.model(rest, restored))
    token = torch.tensor([7])
    assert torch.equal(smollm2.model(token, cache), smollm2.model(token, restored))


def test_a_saved_cache_that_does_not_add_up_is_refused(smollm2, prose_ids):
    cache = smollm2.model.new_cache(sparse=SMALL)
    smollm2.model(torch.tensor(prose_ids[:300]), cache)
    tensors, meta = cache.state()
    meta["layers"][0]["length"] = 299
    with pytest.raises(ValueError, match="length"):
        ModelCache.from_state(tensors, meta)
    tensors, meta = cache.state()
    tensors = {**tensors, "layers.2.rotated": tensors["layers.2.rotated"][:, :100]}
    with pytest.raises(ValueError, match="rotated"):
        ModelCache.from_state(tensors, meta)


def test_params_enable_and_trained_length(smollm2):
    params = long_context.params_for(smollm2.model)
    trained = smollm2.model.args.max_position_embeddings
    assert long_context.trained_length(smollm2) == trained
    assert params.dense_len == trained and params.memory_distance < trained
    copy = dataclasses.replace(smollm2)
    long_context.enable(copy)
    assert copy.sparse == params and copy.long_context == "extended" and smollm2.sparse is None
    assert long_context.trained_length(dataclasses.replace(smollm2, family="minicpm_sala")) is None
    with pytest.raises(ValueError, match="multiple"):
        LongContextParams(window=100)


def test_passkey_at_16k_tokens_of_real_prose(smollm2):
    """One passkey at 40 % depth of 16K tokens of the standard library's docstrings, through ChatSession
    as `salachat ask` reads it: the extension turns on by itself, the key lies 9K tokens before the
    question (far outside the local window), and the question's words bring its passage back: placed before
    the question and as the answer's memory, it is read at positions the model knows (the dense model's
    answers this far past its trained length are broken text)."""
    from salachat.engine.generate import Sampling

    from salachat.chat import ChatSession

    paragraphs = longdoc.stdlib_paragraphs(limit_chars=120_000)
    key = str(random.Random(40).randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    text = longdoc.haystack(paragraphs, smollm2.tokenizer, 16_000, [(0.4, needle)])
    notes = []
    session = ChatSession.open(text=text, loaded=smollm2, on_note=notes.append, chunk_size=2048)
    assert session.context().long_context == "extended" and len(notes) == 1
    assert session.conversation.document_tokens > 16_000
    answer = "".join(session.ask(longdoc.PASSKEY_QUESTION, Sampling(max_tokens=12)))
    assert key in session.turns[0].quoted
    assert key in answer, answer
