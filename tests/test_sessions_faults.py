"""A session survives what happens to real files: kill -9 in the middle of a save, truncation, a flipped byte,
another model's weights, a folder that is not a session, a full disk. The last good save stays loadable and
the user gets one clear line (exit code 5), never a traceback or a silently wrong answer."""

import errno
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from salachat.engine.generate import Sampling

from salachat import errors
from salachat.conversation import Conversation
from salachat.sessions import SessionError, SessionSaveError, SessionWriter, load_conversation, read_manifest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
TEXT = "The harbour light of Varna Point was built in 1871 and kept by Tomas Brandt for thirty-one years. " * 2
PROBE = [5, 17, 42]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from sala_tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("sala") / "tiny")


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    from salachat.engine.loader import load_model

    return load_model(str(tiny_folder), device="cpu", dtype=torch.float32)


def _save_session(loaded, folder: Path, turns: int = 1) -> Conversation:
    conversation = Conversation(loaded, chunk_size=64)
    conversation.set_documents(TEXT)
    writer = SessionWriter(folder, documents=[{"source": "light.txt", "kind": "text", "title": "Light",
                                               "content_hash": "h", "segments": 1, "skipped": 0}])
    conversation.read(on_chunk=writer.save)
    for i in range(turns):
        "".join(conversation.ask(f"question {i}?", Sampling(max_tokens=3)))
        writer.save(conversation)
    writer.close()  # as when the process that saved it ends: another salachat may open it now
    return conversation


def _finished_logits(conversation) -> torch.Tensor:
    conversation.read()
    return conversation.loaded.model(torch.tensor(PROBE), conversation.cache)


CHILD = textwrap.dedent("""
    import sys, time, torch
    from salachat.engine.loader import load_model
    from salachat.conversation import Conversation
    from salachat.sessions import SessionWriter, atomic

    real = atomic.write_chunk
    def announced(f, data):  # small pieces, each announced, so the parent can kill inside a chosen file
        view = memoryview(data).cast("B")
        for i in range(0, len(view), 2048):
            real(f, view[i:i + 2048])
            print("piece", f.name, flush=True)
            time.sleep(0.002)
    atomic.write_chunk = announced
    loaded = load_model(sys.argv[1], device="cpu", dtype=torch.float32)
    conversation = Conversation(loaded, chunk_size=32)
    conversation.set_documents(sys.argv[3])
    writer = SessionWriter(__import__("pathlib").Path(sys.argv[2]), documents=[])
    def save(c):
        writer.save(c)
        print("saved", c.cache.position, flush=True)
    conversation.read(on_chunk=save)
    print("done", flush=True)
""")


def test_kill_9_during_saves_leaves_the_last_good_state(tiny, tiny_folder, tmp_path):
    reference = Conversation(tiny, chunk_size=32)
    reference.set_documents(TEXT * 2)
    expected = _finished_logits(reference)
    rng = random.Random(1234)
    killed_in = []
    for attempt in range(4):
        folder = tmp_path / f"s{attempt}"
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_folder), str(folder), TEXT * 2],
                                 stdout=subprocess.PIPE, text=True, cwd=HERE.parent,
                                 env={"PYTHONPATH": str(HERE.parent), "PATH": "/usr/bin:/bin"})
        seen = [child.stdout.readline() for _ in range(rng.randint(30, 120))]
        assert any(line.startswith("saved") for line in seen), "the child never saved"
        child.kill()  # SIGKILL inside a write: no cleanup, no flush
        out = "".join(seen) + child.stdout.read()
        child.wait()
        killed_in.append(seen[-1].split()[-1] if seen[-1].startswith("piece") else seen[-1])
        assert "done" not in out, "the child finished before the kill: make its saves slower"
        last_reported = max([int(line.split()[1]) for line in out.splitlines() if line.startswith("saved")] + [32])
        SessionWriter(folder)  # opening for writing removes what the killed save left behind
        manifest = read_manifest(folder)
        assert {p.name for p in folder.iterdir()} == set(manifest["files"]) | {"manifest.json", "lock"}
        conversation, manifest = load_conversation(folder, tiny)
        assert manifest["tokens"] >= last_reported  # a save may commit before its "saved" line got out
        assert torch.equal(_finished_logits(conversation), expected)
    assert sum(name.endswith(".tmp") for name in killed_in) >= 3, killed_in  # the kills did land inside saves


def test_full_disk_mid_file_keeps_the_previous_save(tiny, tmp_path, monkeypatch):
    from salachat.sessions import atomic

    folder = tmp_path / "s"
    conversation = _save_session(tiny, folder)
    saved_tokens = read_manifest(folder)["tokens"]
    writer = SessionWriter(folder)
    "".join(conversation.ask("and then?", Sampling(max_tokens=3)))
    budget = {"bytes": 3000}

    def full_disk(f, data):
        budget["bytes"] -= len(data)
        if budget["bytes"] < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        f.write(data)

    monkeypatch.setattr(atomic, "write_chunk", full_disk)
    with pytest.raises(SessionSaveError) as failure:
        writer.save(conversation)
    message = str(failure.value)
    assert "No space left on device" in message and f"{saved_tokens:,} tokens) is kept" in message
    assert "\n" not in message
    monkeypatch.undo()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    restored, manifest = load_conversation(folder, tiny)
    assert manifest["tokens"] == saved_tokens == restored.cache.position
    writer.save(conversation)  # once there is room again, the same writer saves everything
    assert load_conversation(folder, tiny)[0].cache.position == conversation.cache.position


def _truncate_kv(folder):
    path = max(folder.glob("kv-*.safetensors"), key=lambda p: p.stat().st_size)
    path.write_bytes(path.read_bytes()[:-100])


def _flip_kv_byte(folder):
    path = max(folder.glob("kv-*.safetensors"), key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _flip_manifest_byte(folder):
    path = folder / "manifest.json"
    text = path.read_text()
    path.write_text(text.replace('"tokens": ', '"tokens": 1', 1))


def _delete_state_file(folder):
    next(folder.glob("state-*.safetensors")).unlink()


def _other_weights(folder):
    from sala_tiny import write_tiny_checkpoint

    model_folder = Path(read_manifest(folder)["model"]["id"])
    write_tiny_checkpoint(model_folder, seed=1)  # same path, same shapes, different weights


@pytest.mark.parametrize("damage, expected", [
    (_truncate_kv, "truncated"),
    (_flip_kv_byte, "fails its checksum"),
    (_flip_manifest_byte, "manifest checksum"),
    (_delete_state_file, "is missing"),
    (_other_weights, "other weights"),
], ids=["truncated-file", "flipped-byte", "edited-manifest", "missing-file", "another-model"])
def test_damaged_session_is_one_line_and_exit_code_5(salachat_cli, tmp_path, damage, expected):
    from sala_tiny import write_tiny_checkpoint
    from salachat.engine.loader import load_model

    model_folder = write_tiny_checkpoint(tmp_path / "model")  # its own copy: one case rewrites the weights
    loaded = load_model(str(model_folder), device="cpu", dtype=torch.float32)
    folder = salachat_cli.home / "sessions" / "light"
    _save_session(loaded, folder)
    damage(folder)
    result = salachat_cli("resume", "light", "Who kept it?", "--max-tokens", "2", timeout=120)
    assert result.returncode == errors.NO_SESSION, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_folder_that_is_not_a_session_is_named_as_such(salachat_cli):
    junk = salachat_cli.home / "sessions" / "holiday-photos"
    junk.mkdir(parents=True)
    (junk / "beach.jpg").write_bytes(b"\xff\xd8")
    result = salachat_cli("resume", "holiday-photos", "what?")
    assert result.returncode == errors.NO_SESSION
    assert "is not a salachat session" in result.stderr and "Traceback" not in result.stderr
    listing = salachat_cli("sessions")
    assert listing.returncode == 0 and "holiday-photos" in listing.stdout and "unusable" in listing.stdout
    removed = salachat_cli("sessions", "rm", "holiday-photos")
    assert removed.returncode == errors.NO_SESSION and "did not write" in removed.stderr
    assert (junk / "beach.jpg").exists()  # listing, loading and rm never delete what is not ours


def test_unknown_and_badly_named_sessions_are_one_line(salachat_cli):
    missing = salachat_cli("resume", "nope", "what?")
    assert missing.returncode == errors.NO_SESSION and "no session named 'nope'" in missing.stderr
    bad = salachat_cli("sessions", "show", "../etc")
    assert bad.returncode == errors.NO_SESSION and "session name" in bad.stderr


def test_session_api_refuses_a_foreign_model(tiny, tmp_path):
    from sala_tiny import write_tiny_checkpoint
    from salachat.engine.loader import load_model

    _save_session(tiny, tmp_path / "s")
    other = load_model(str(write_tiny_checkpoint(tmp_path / "other", seed=7)), device="cpu", dtype=torch.float32)
    with pytest.raises(SessionError, match="other weights"):
        load_conversation(tmp_path / "s", other)


def test_first_save_killed_before_its_manifest_can_start_over(tiny, tmp_path):
    from salachat.sessions import abandoned_before_first_save

    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "kv-000000.safetensors.tmp").write_bytes(b"half a file")
    assert abandoned_before_first_save(folder)
    _save_session(tiny, folder)  # SessionWriter cleans the leftover, the save commits
    assert not (folder / "kv-000000.safetensors.tmp").exists() and read_manifest(folder)["tokens"] > 0
    (folder / "notes.txt").write_text("mine")
    assert not abandoned_before_first_save(folder)


def test_a_session_open_for_writing_is_refused_to_a_second_writer(tiny, tmp_path):
    _save_session(tiny, tmp_path / "s")
    SessionWriter(tmp_path / "s")  # this process now holds the session's lock
    second = ("import sys, pathlib\nfrom salachat.sessions import SessionWriter, SessionError\n"
              "try:\n    SessionWriter(pathlib.Path(sys.argv[1]))\nexcept SessionError as e:\n    print(e)")
    other = subprocess.run([sys.executable, "-c", second, str(tmp_path / "s")], check=False,
                           capture_output=True, text=True, cwd=HERE.parent)
    assert "is open in another salachat" in other.stdout, other.stderr
    SessionWriter(tmp_path / "s")  # the same process may open it again (the writers share the lock)


@pytest.mark.parametrize("tree", ["xxh3", "sha256"])
@pytest.mark.parametrize("size", [0, 999, 1000, 2500, 4000])
def test_piece_checksums_catch_a_flipped_byte_in_any_piece(tmp_path, monkeypatch, size, tree):
    """Checksums are a hash over 64 MiB pieces (1000 bytes here) so that a load verifies pieces in parallel:
    streaming (write) and parallel (verify) agree, on piece edges too, and a flipped byte anywhere is caught,
    in the XXH3-128 tree new saves write and in the sha256 tree of older sessions."""
    import hashlib

    from salachat.sessions import atomic, manifest

    monkeypatch.setattr(atomic, "PIECE", 1000)
    monkeypatch.setattr(manifest, "PIECE", 1000)
    if tree == "sha256":  # written as a salachat before XXH3 wrote them
        monkeypatch.setattr(atomic, "SAVED_TREE", atomic.SHA256_TREE)
    data = bytes(random.Random(size).getrandbits(8) for _ in range(size))
    checksum, written = atomic.write_atomic(tmp_path / "f.bin", [data[: size // 3], data[size // 3 :]])
    pieces = [data[i : i + 1000] for i in range(0, size, 1000)] or [b""]
    if tree == "sha256":  # the older format, spelled out with hashlib alone
        top = hashlib.sha256(b"".join(hashlib.sha256(piece).digest() for piece in pieces)).hexdigest()
        assert checksum == "tree64m:" + top
    else:
        import xxhash

        top = xxhash.xxh3_128(b"".join(xxhash.xxh3_128(piece).digest() for piece in pieces)).hexdigest()
        assert checksum == "xxh3tree64m:" + top
    assert written == size
    files = {"manifest": {"files": {"f.bin": {"sha256": checksum, "bytes": size}}}}
    manifest.verify_files(tmp_path, files["manifest"])
    for position in ([0, size // 2, size - 1] if size else []):
        damaged = bytearray(data)
        damaged[position] ^= 1
        (tmp_path / "f.bin").write_bytes(bytes(damaged))
        with pytest.raises(manifest.SessionError, match="fails its checksum"):
            manifest.verify_files(tmp_path, files["manifest"])
    (tmp_path / "f.bin").write_bytes(data[: size // 2])
    if size:
        with pytest.raises(manifest.SessionError, match="truncated"):
            manifest.verify_files(tmp_path, files["manifest"])
