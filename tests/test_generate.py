"""Generation: cached streaming decode equals recomputation; chunked prefill equals one shot; sampling."""

import random

import pytest
import torch
from salachat.engine.generate import Cancelled, Sampling, Stats, generate, penalise_repeats, prefill, sample


def test_cached_greedy_decode_equals_recomputing_the_full_sequence(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": "Name three colours of the rainbow."}])
    stats = Stats()
    sampling = Sampling(max_tokens=24)  # the defaults: greedy with the repeat penalty and min-p
    streamed = "".join(generate(model, tok, prompt, smollm2.new_cache(), sampling, stats=stats))
    # Recompute: the whole sequence from an empty cache at every step, no cache reuse.
    ids = list(prompt)
    generated = []
    for _ in range(stats.generated_tokens):
        token = sample(model(torch.tensor(ids), smollm2.new_cache())[-1], sampling, None, generated)
        generated.append(token)
        ids.append(token)
        if token in tok.stop_ids:
            break
    expected = tok.decode([t for t in generated if t not in tok.stop_ids])
    assert streamed == expected
    assert stats.generated_tokens == len(generated)


def test_chunked_prefill_equals_one_shot(smollm2):
    tok = smollm2.tokenizer
    ids = tok.encode("The keeper counted 4,112 ships in 1937. " * 20)
    one_shot = smollm2.model(torch.tensor(ids), smollm2.new_cache())[-1]
    rng = random.Random(0)
    for _ in range(3):
        cache = smollm2.new_cache()
        chunk = rng.randint(1, 97)
        last = prefill(smollm2.model, ids, cache, chunk_size=chunk)
        assert cache.position == len(ids)
        assert (last - one_shot).abs().max().item() < 1e-4, chunk


def test_prefill_reports_progress_and_can_be_cancelled_between_chunks(smollm2):
    ids = smollm2.tokenizer.encode("word " * 100)
    seen = []
    cache = smollm2.new_cache()
    try:
        prefill(smollm2.model, ids, cache, chunk_size=32, progress=lambda d, t, e: seen.append((d, t)),
                should_stop=lambda: len(seen) >= 2)
    except Cancelled:
        pass
    else:
        raise AssertionError("prefill did not stop")
    assert seen == [(32, len(ids)), (64, len(ids))]
    assert cache.position == 64  # what was read stays in the cache


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    draws = {sample(logits, Sampling(temperature=1.0, top_p=0.7), gen) for _ in range(300)}
    assert draws == {0, 1}
    assert sample(logits, Sampling(temperature=0.0), None) == 0


def test_seeded_sampling_is_reproducible(smollm2):
    tok = smollm2.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": "Tell me a word."}])
    runs = [
        "".join(generate(smollm2.model, tok, prompt, smollm2.new_cache(),
                         Sampling(temperature=0.8, top_p=0.9, max_tokens=12, seed=7)))
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_repeat_penalty_follows_llama_cpp():
    # positive logits are divided by the penalty, negative ones multiplied: both lose ground
    logits = torch.tensor([3.0, 2.9, -1.0, -1.2])
    sampling = Sampling(repeat_penalty=1.5, min_p=0.0)
    assert sample(logits, sampling, None) == 0
    assert sample(logits, sampling, None, recent=[0]) == 1  # 3.0 / 1.5 = 2.0 < 2.9
    penalised = penalise_repeats(logits, [0, 2, 2], 1.5)
    assert penalised.tolist() == pytest.approx([2.0, 2.9, -1.5, -1.2])
    # only the last repeat_last_n tokens count
    assert sample(logits, Sampling(repeat_penalty=1.5, repeat_last_n=1, min_p=0.0), None, recent=[0, 3]) == 0
    assert sample(logits, Sampling(repeat_penalty=1.5, repeat_last_n=0, min_p=0.0), None, recent=[0]) == 0


def test_min_p_drops_tokens_far_below_the_best():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    draws = {sample(logits, Sampling(temperature=1.0, min_p=0.35), gen) for _ in range(400)}
    assert draws == {0, 1}  # 0.15 < 0.35 * 0.5
    draws = {sample(logits, Sampling(temperature=1.0, min_p=0.0), gen) for _ in range(400)}
    assert draws == {0, 1, 2, 3}


def test_a_reading_leaves_room_for_its_question_and_answer(smollm2):
    """A reading that grows the dense caches reserves ANSWER_ROOM past it: a short question and an answer then
    append in place (a regrow copies the whole cache, the old and the new held at once)."""
    from salachat.engine.generate import ANSWER_ROOM

    cache = smollm2.new_cache()
    prefill(smollm2.model, list(range(100, 1124)), cache)  # 1024 tokens: a multiple of the growth step
    first = cache.layers[0]
    held = first.keys.data_ptr()
    assert first.keys.shape[1] >= 1024 + ANSWER_ROOM
    prefill(smollm2.model, list(range(200, 240)), cache)  # the question
    token = 5
    for _ in range(60):  # the answer
        token = int(smollm2.model(torch.tensor([token]), cache)[-1].argmax())
    assert first.length == 1124 and first.keys.data_ptr() == held
