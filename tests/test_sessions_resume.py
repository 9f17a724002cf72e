"""A saved session resumes exactly: bit-identical logits to never having stopped (CPU fp32), over several turns,
after a reading interrupted midway, for the default model and a tiny MiniCPM-SALA; saves write only what grew."""

import sys
from pathlib import Path

import pytest
import torch
from salachat.engine.generate import Cancelled, Sampling

from salachat.conversation import Conversation
from salachat.sessions import Checkpointer, SessionWriter, load_conversation
from salachat.sessions.safetensors_io import load_tensors_mmap

TEXT = ("The harbour light of Varna Point was built in 1871. Tomas Brandt kept it for thirty-one years, "
        "and his daughter Ilse kept the log. ")
QUESTIONS = ["Who kept the light?", "When was it built?", "Who kept the log?"]
PROBE = [5, 17, 42]
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def tiny_sala(tmp_path_factory):
    from sala_tiny import write_tiny_checkpoint
    from salachat.engine.loader import load_model

    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("sala") / "tiny")
    return load_model(str(folder), device="cpu", dtype=torch.float32)


def _stop_after(chunks: int):
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > chunks

    return should_stop


def _uninterrupted(loaded, chunk_size, max_tokens):
    conversation = Conversation(loaded, chunk_size=chunk_size)
    conversation.set_documents(TEXT)
    conversation.read()
    answers = ["".join(conversation.ask(q, Sampling(max_tokens=max_tokens))) for q in QUESTIONS]
    return answers, loaded.model(torch.tensor(PROBE), conversation.cache)


def _stopped_and_resumed_each_turn(loaded, folder, chunk_size, max_tokens):
    conversation = Conversation(loaded, chunk_size=chunk_size)
    conversation.set_documents(TEXT)
    writer = SessionWriter(folder, documents=[])
    with pytest.raises(Cancelled):
        conversation.read(should_stop=_stop_after(2), on_chunk=writer.save)
    assert 0 < len(conversation.pending_ids) < conversation.document_tokens
    answers = []
    for question in [None, *QUESTIONS]:  # a fresh process each time: only the folder carries over
        conversation, _ = load_conversation(folder, loaded)
        writer = SessionWriter(folder)
        if question is None:
            conversation.read(on_chunk=writer.save)
        else:
            answers.append("".join(conversation.ask(question, Sampling(max_tokens=max_tokens))))
        writer.save(conversation)
    conversation, _ = load_conversation(folder, loaded)
    return answers, loaded.model(torch.tensor(PROBE), conversation.cache)


@pytest.mark.parametrize("model", ["smollm2", "tiny_sala"])
def test_resumed_session_continues_bit_exact(model, request, tmp_path):
    loaded = request.getfixturevalue(model)
    chunk_size, max_tokens = (32, 3) if model == "smollm2" else (64, 4)
    expected_answers, expected_logits = _uninterrupted(loaded, chunk_size, max_tokens)
    answers, logits = _stopped_and_resumed_each_turn(loaded, tmp_path / "s", chunk_size, max_tokens)
    assert answers == expected_answers
    assert torch.equal(logits, expected_logits)


def test_sala_session_past_dense_len_holds_sparse_and_lightning_state(tiny_sala, tmp_path):
    conversation = Conversation(tiny_sala, chunk_size=64)
    conversation.set_documents(TEXT)
    conversation.read()
    assert conversation.cache.position > tiny_sala.model.args.sparse.dense_len  # the sparse path was taken
    SessionWriter(tmp_path / "s", documents=[]).save(conversation)
    restored, manifest = load_conversation(tmp_path / "s", tiny_sala)
    kinds = [layer["kind"] for layer in manifest["cache"]["meta"]["layers"]]
    assert kinds == ["sparse_kv", "lightning", "lightning", "sparse_kv"]
    assert torch.equal(restored.cache.layers[1].recurrent, conversation.cache.layers[1].recurrent)


def test_later_saves_write_only_the_new_kv_tail(tiny_sala, tmp_path):
    conversation = Conversation(tiny_sala, chunk_size=64)
    conversation.set_documents(TEXT)
    writer = SessionWriter(tmp_path / "s", documents=[])
    conversation.read(on_chunk=writer.save)
    manifest = writer.manifest
    keys = manifest["cache"]["tensors"]["layers.0.keys"]
    assert [s["length"] for s in keys["segments"]][:2] == [64, 64]
    assert sum(s["length"] for s in keys["segments"]) == conversation.cache.position
    # The last save wrote one chunk of KV, not the whole cache: its KV file is ~1/n of the total.
    kv_files = [name for name in manifest["files"] if name.startswith("kv-")]
    last = max(kv_files)
    total = sum(manifest["files"][n]["bytes"] for n in kv_files)
    assert manifest["files"][last]["bytes"] < 2 * total / len(kv_files)
    # Lightning states are rewritten whole: exactly one state file is referenced, older ones are gone.
    assert len([n for n in manifest["files"] if n.startswith("state-")]) == 1
    on_disk = {p.name for p in (tmp_path / "s").iterdir()}
    assert on_disk == set(manifest["files"]) | {"manifest.json", "lock"}


def test_kv_tensors_load_memory_mapped(tiny_sala, tmp_path):
    conversation = Conversation(tiny_sala, chunk_size=64)
    conversation.set_documents(TEXT)
    conversation.read()
    SessionWriter(tmp_path / "s", documents=[]).save(conversation)
    kv_file = next((tmp_path / "s").glob("kv-*.safetensors"))
    tensors = load_tensors_mmap(kv_file)
    storage = tensors["layers.0.keys"].untyped_storage()
    # A view of the file mapping (shared storage of the whole file), not a copy of one tensor's bytes.
    assert storage.nbytes() >= kv_file.stat().st_size - 8 - 4096
    assert torch.equal(tensors["layers.0.keys"], conversation.cache.layers[0].state()["keys"])


def test_rebuilt_cache_is_saved_whole_not_spliced(tiny_sala, tmp_path):
    """A tensor that changed where it was already saved (not a pure append) must not be glued to old segments."""
    writer = SessionWriter(tmp_path / "s", documents=[])
    first = Conversation(tiny_sala, chunk_size=64)
    first.set_documents(TEXT)
    first.read()
    writer.save(first)
    other = Conversation(tiny_sala, chunk_size=64)
    other.set_documents(TEXT.replace("Varna", "Sozop").replace("1871", "1902") * 2)
    other.read()
    writer.save(other)
    assert len(writer.manifest["cache"]["tensors"]["layers.0.keys"]["segments"]) == 1
    restored, _ = load_conversation(tmp_path / "s", tiny_sala)
    assert torch.equal(restored.cache.layers[0].state()["keys"], other.cache.layers[0].state()["keys"])


def test_checkpointer_keeps_saving_under_its_budget():
    clock = {"t": 0.0}
    saves = []

    class Fake:
        chunk_size = 10

        class cache:
            position = 0

    def save(conversation):
        clock["t"] += 0.5  # each save costs 0.5 s
        saves.append(conversation.cache.position)

    checkpointer = Checkpointer(save, budget=0.05, clock=lambda: clock["t"])
    for step in range(1, 401):  # 400 chunks of 10 tokens at 0.1 s each
        clock["t"] += 0.1
        Fake.cache.position = step * 10
        checkpointer(Fake)
    reading = 400 * 0.1
    assert checkpointer.save_seconds <= 0.05 * reading + 0.5  # the first save is taken before anything is known
    # 0.5 s / 5% = 10 s of reading = 100 chunks = 1000 tokens (one more chunk where float sums fall short)
    assert len(saves) >= 3 and checkpointer.intervals[-1] in (1000, 1010)


def test_a_packed_model_resumes_packed_and_a_session_saved_with_fp32_kv_still_resumes(smollm2_path):
    """The default model keeps its GGUF weights packed and its K/V in 16 bits (bf16 or fp16 by the CPU); its
    session says so (`packed`), so `resume` loads it packed again (a dtype would dequantise it). A session
    saved while the CPU cache was fp32, or in the other 16-bit kind (saved on a CPU that chose it), resumes
    with that cache, as it was saved."""
    from salachat.engine.loader import load_model
    from salachat.engine.qlinear import KV_DTYPE

    from salachat.chat import ChatSession, _model_for
    from salachat.sessions.manifest import read_manifest

    smollm2 = load_model(str(smollm2_path), device="cpu")  # as the CLI loads it: packed
    greedy = Sampling(max_tokens=4)
    chat = ChatSession.open(text=TEXT.encode(), loaded=smollm2, session="packed")
    chat.answer(QUESTIONS[0], greedy)
    manifest = read_manifest(chat.writer.folder)
    assert manifest["model"]["packed"] is True and chat.conversation.cache.layers[0].keys.dtype == KV_DTYPE
    again = _model_for(manifest, smollm2.model_id, "cpu")
    assert again.packed and again.new_cache().layers[0].keys.dtype == KV_DTYPE

    other = torch.float16 if KV_DTYPE == torch.bfloat16 else torch.bfloat16
    for saved in (torch.float32, other):  # fp32: what the CPU cache was before
        smollm2.model.kv_dtype = saved
        try:
            old = ChatSession.open(text=TEXT.encode(), loaded=smollm2, session=f"kv-{saved}".replace(".", "-"))
            old.answer(QUESTIONS[0], greedy)
            twin = old.fork()
        finally:
            smollm2.model.kv_dtype = KV_DTYPE
        resumed = ChatSession.resume(f"kv-{saved}".replace(".", "-"), loaded=smollm2)
        assert resumed.conversation.cache.layers[0].keys.dtype == saved
        assert resumed.answer(QUESTIONS[1], greedy)[0] == twin.answer(QUESTIONS[1], greedy)[0]
