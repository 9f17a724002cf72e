"""Lazy resume: the sparse layers' K/V streams in after `load_session` returns; answers are bit-identical to a
full load, a layer is plain SparseKVCache once used, and a damaged piece refuses at first use (before any
logits), never a silently wrong answer. Pieces are made small here so one file holds many."""

import json
import sys
from pathlib import Path

import pytest
import torch
from salachat.engine.generate import Sampling
from salachat.engine.sparse_cache import SparseKVCache

from salachat.conversation import Conversation
from salachat.sessions import SessionError, SessionWriter, atomic, load_conversation, load_session
from salachat.sessions import manifest as manifest_module

sys.path.insert(0, str(Path(__file__).parent))
TEXT = ("The harbour light of Varna Point was built in 1871. Tomas Brandt kept it for thirty-one years, "
        "and his daughter Ilse kept the log. ")
PROBE = [5, 17, 42]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sala_tiny import write_tiny_checkpoint
    from salachat.engine.loader import load_model

    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("sala") / "tiny")
    return load_model(str(folder), device="cpu", dtype=torch.float32)


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(atomic, "PIECE", 4096)
    monkeypatch.setattr(manifest_module, "PIECE", 4096)


def _saved(tiny, folder: Path) -> Conversation:
    conversation = Conversation(tiny, chunk_size=64)
    conversation.set_documents(TEXT)
    writer = SessionWriter(folder, documents=[])
    conversation.read(on_chunk=writer.save)  # several saves: K/V in several segment files
    "".join(conversation.ask("Who kept the light?", Sampling(max_tokens=3)))
    writer.save(conversation)
    writer.close()
    assert conversation.cache.position > tiny.model.args.sparse.dense_len  # the sparse path is in play
    return conversation


def test_lazy_resume_answers_bit_identical_to_a_full_load(tiny, tmp_path, small_pieces):
    reference = _saved(tiny, tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert any(len(f.get("pieces", [])) > 3 for f in manifest["files"].values())  # per-piece digests recorded
    lazy = load_session(tmp_path / "s", tiny)
    assert lazy.stream is not None
    sparse = [layer for layer in lazy.state.cache.layers if isinstance(layer, SparseKVCache)]
    assert sparse and all(type(layer) is not SparseKVCache for layer in sparse)  # still streaming (or waiting)
    full = load_session(tmp_path / "s", tiny, lazy=False)
    assert full.stream is None
    lazy_logits = tiny.model(torch.tensor(PROBE), lazy.state.cache)
    assert all(type(layer) is SparseKVCache for layer in sparse)  # used once: a plain cache again
    assert torch.equal(lazy_logits, tiny.model(torch.tensor(PROBE), full.state.cache))
    assert torch.equal(lazy_logits, tiny.model(torch.tensor(PROBE), reference.cache))
    lazy.stream.wait()
    assert lazy.stream.seconds is not None


def test_lazily_resumed_conversation_continues_like_the_original(tiny, tmp_path, small_pieces):
    reference = _saved(tiny, tmp_path / "s")
    resumed, _ = load_conversation(tmp_path / "s", tiny)
    question, sampling = "When was it built?", Sampling(max_tokens=4)
    assert "".join(resumed.ask(question, sampling)) == "".join(reference.ask(question, sampling))
    assert torch.equal(tiny.model(torch.tensor(PROBE), resumed.cache), tiny.model(torch.tensor(PROBE), reference.cache))


def _flip(path: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("pieces", [True, False], ids=["piece-digests", "file-checksum-only"])
def test_a_damaged_piece_refuses_at_first_use_not_with_a_wrong_answer(tiny, tmp_path, small_pieces, pieces):
    _saved(tiny, tmp_path / "s")
    if not pieces:  # a session saved before per-piece digests: the layer waits for whole files
        path = tmp_path / "s" / "manifest.json"
        body = json.loads(path.read_text())
        body.pop("checksum")
        for info in body["files"].values():
            info.pop("pieces", None)
        path.write_text(json.dumps({**body, "checksum": manifest_module._checksum(body)}))
    kv = max((tmp_path / "s").glob("kv-*.safetensors"), key=lambda p: p.stat().st_size)
    _flip(kv, 0.7)  # K/V bytes: only the stream reads them
    resumed = load_session(tmp_path / "s", tiny)  # returns: the damage is in what streams in later
    with pytest.raises(SessionError, match="fails its checksum") as failure:
        tiny.model(torch.tensor(PROBE), resumed.state.cache)
    assert "\n" not in str(failure.value)
    with pytest.raises(SessionError, match="fails its checksum"):
        resumed.stream.wait()
    with pytest.raises(SessionError):  # and the layer stays unusable, however it is asked again
        resumed.state.cache.state()


def test_a_full_load_reports_the_same_damage_before_it_returns(tiny, tmp_path, small_pieces):
    _saved(tiny, tmp_path / "s")
    _flip(max((tmp_path / "s").glob("kv-*.safetensors"), key=lambda p: p.stat().st_size), 0.7)
    with pytest.raises(SessionError, match="fails its checksum"):
        load_session(tmp_path / "s", tiny, lazy=False)


def test_saving_a_lazily_resumed_session_waits_for_its_state(tiny, tmp_path, small_pieces):
    reference = _saved(tiny, tmp_path / "s")
    resumed, _ = load_conversation(tmp_path / "s", tiny)
    SessionWriter(tmp_path / "copy", documents=[]).save(resumed)  # reads every layer's state
    again, _ = load_conversation(tmp_path / "copy", tiny, lazy=False)
    assert torch.equal(tiny.model(torch.tensor(PROBE), again.cache), tiny.model(torch.tensor(PROBE), reference.cache))


def test_a_process_that_ends_while_its_session_streams_in_exits_cleanly(tiny, tmp_path):
    import subprocess

    _saved(tiny, tmp_path / "s")
    child = ("import sys, torch\nfrom pathlib import Path\nfrom salachat.engine.loader import load_model\n"
             "from salachat.sessions import load_session\n"
             "loaded = load_model(sys.argv[1], device='cpu', dtype=torch.float32)\n"
             "resumed = load_session(Path(sys.argv[2]), loaded)\nprint('loaded', resumed.stream is not None)\n")
    result = subprocess.run([sys.executable, "-c", child, tiny.model_id, str(tmp_path / "s")], capture_output=True,
                            text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "loaded True", result.stderr
    assert result.stderr.strip() == "", result.stderr
