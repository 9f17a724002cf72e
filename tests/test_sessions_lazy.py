"""Lazy resume: the sparse layers' K/V streams in after `load_session` returns; answers are bit-identical to a
full load, a layer is plain SparseKVCache once used, and a damaged piece refuses at first use (before any
logits), never a silently wrong answer. Pieces are made small here so one file holds many."""

import hashlib
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
from test_sessions_hostile import _resign

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


def _without_pieces(body: dict) -> None:
    for info in body["files"].values():
        info.pop("pieces", None)


def _plain_sha256(folder: Path):
    def mutate(body: dict) -> None:
        for name, info in body["files"].items():
            info.pop("pieces", None)
            info["sha256"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    return mutate


FORMATS = ["xxh3-pieces", "xxh3-file-only", "sha256-pieces", "sha256-file-only", "plain-sha256"]


def _saved_as(tiny, folder: Path, form: str, monkeypatch) -> Conversation:
    """A session as each salachat wrote it: XXH3-128 trees now, sha256 trees before, a plain sha256 of each
    file before per-piece digests; "file-only" is a tree checksum whose manifest lists no piece digests."""
    if form.startswith("sha256"):
        monkeypatch.setattr(atomic, "SAVED_TREE", atomic.SHA256_TREE)
    conversation = _saved(tiny, folder)
    monkeypatch.setattr(atomic, "SAVED_TREE", atomic.XXH3_TREE)
    prefix = {"xxh3": "xxh3tree64m:", "sha256": "tree64m:", "plain": ""}[form.split("-")[0]]
    if form.endswith("file-only"):
        _resign(folder, _without_pieces)
    elif form == "plain-sha256":
        _resign(folder, _plain_sha256(folder))
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert all(info["sha256"].startswith(prefix) and info["sha256"] != prefix for info in files.values())
    if form == "sha256-pieces":  # byte for byte what the salachat before XXH3 wrote: sha256 over sha256s
        kv = max(files, key=lambda name: files[name]["bytes"])
        data = (folder / kv).read_bytes()
        digests = [hashlib.sha256(data[i : i + atomic.PIECE]).digest()
                   for i in range(0, len(data), atomic.PIECE)]
        assert files[kv]["pieces"] == [d.hex() for d in digests]
        assert files[kv]["sha256"] == "tree64m:" + hashlib.sha256(b"".join(digests)).hexdigest()
    return conversation


@pytest.mark.parametrize("form", FORMATS)
def test_sessions_of_every_checksum_format_resume_bit_identical(tiny, tmp_path, small_pieces, monkeypatch,
                                                                 form):
    reference = _saved_as(tiny, tmp_path / "s", form, monkeypatch)
    lazy = load_session(tmp_path / "s", tiny)
    assert (lazy.stream is None) == (form == "plain-sha256")  # a whole-file sha256 is not checked piecewise
    full = load_session(tmp_path / "s", tiny, lazy=False)
    lazy_logits = tiny.model(torch.tensor(PROBE), lazy.state.cache)
    assert torch.equal(lazy_logits, tiny.model(torch.tensor(PROBE), full.state.cache))
    assert torch.equal(lazy_logits, tiny.model(torch.tensor(PROBE), reference.cache))
    if lazy.stream is not None:
        lazy.stream.wait()


@pytest.mark.parametrize("form", FORMATS)
def test_a_damaged_piece_refuses_at_first_use_not_with_a_wrong_answer(tiny, tmp_path, small_pieces,
                                                                      monkeypatch, form):
    _saved_as(tiny, tmp_path / "s", form, monkeypatch)
    kv = max((tmp_path / "s").glob("kv-*.safetensors"), key=lambda p: p.stat().st_size)
    _flip(kv, 0.7)  # K/V bytes: only the stream reads them
    if form == "plain-sha256":  # not streamed (no tree to check pieces against): refused before it returns
        with pytest.raises(SessionError, match="fails its checksum"):
            load_session(tmp_path / "s", tiny)
        return
    resumed = load_session(tmp_path / "s", tiny)  # returns: the damage is in what streams in later
    with pytest.raises(SessionError, match="fails its checksum") as failure:
        tiny.model(torch.tensor(PROBE), resumed.state.cache)
    assert "\n" not in str(failure.value)
    with pytest.raises(SessionError, match="fails its checksum"):
        resumed.stream.wait()
    with pytest.raises(SessionError):  # and the layer stays unusable, however it is asked again
        resumed.state.cache.state()


def _data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_a_flipped_byte_in_any_piece_fails_lazy_and_full_loads(tiny, tmp_path, small_pieces):
    _saved(tiny, tmp_path / "s")
    kv = max((tmp_path / "s").glob("kv-*.safetensors"), key=lambda p: p.stat().st_size)
    pristine, start = kv.read_bytes(), _data_start(kv)
    count = -(-len(pristine) // atomic.PIECE)
    files = json.loads((tmp_path / "s" / "manifest.json").read_text())["files"]
    assert count > 3 and "pieces" in files[kv.name]
    for piece in range(count):
        position = max(start, piece * atomic.PIECE + atomic.PIECE // 2)
        position = min(position, len(pristine) - 1)
        damaged = bytearray(pristine)
        damaged[position] ^= 0x04
        kv.write_bytes(bytes(damaged))
        resumed = load_session(tmp_path / "s", tiny)
        with pytest.raises(SessionError, match="fails its checksum"):
            tiny.model(torch.tensor(PROBE), resumed.state.cache)
        with pytest.raises(SessionError, match="fails its checksum"):
            load_session(tmp_path / "s", tiny, lazy=False)
    kv.write_bytes(pristine)
    load_session(tmp_path / "s", tiny).stream.wait()


def test_a_truncated_file_is_refused_before_the_load_returns(tiny, tmp_path, small_pieces):
    _saved(tiny, tmp_path / "s")
    kv = max((tmp_path / "s").glob("kv-*.safetensors"), key=lambda p: p.stat().st_size)
    kv.write_bytes(kv.read_bytes()[: -atomic.PIECE - 1])
    for lazy in (True, False):
        with pytest.raises(SessionError, match="truncated") as failure:
            load_session(tmp_path / "s", tiny, lazy=lazy)
        assert "\n" not in str(failure.value)


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
