"""Sessions against hostile or merely broken files: manifests that pass their checksum but are malformed,
state files that lie about themselves, names that escape the session folder, links, permissions, a data
folder that is a file. Each gives one SessionError line (exit 5 through the entry point), never another
exception, a traceback, a file read outside the session folder or a memory blow-up."""

import copy
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from salachat.engine.generate import Sampling

from salachat import errors
from salachat.conversation import Conversation
from salachat.sessions import (
    SessionError,
    SessionWriter,
    list_sessions,
    load_conversation,
    read_manifest,
)
from salachat.sessions import manifest as manifest_module

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
TEXT = "The harbour light of Varna Point was built in 1871 and kept by Tomas Brandt for thirty-one years. " * 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sala_tiny import write_tiny_checkpoint
    from salachat.engine.loader import load_model

    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("sala") / "tiny")
    return load_model(str(folder), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def template(tiny, tmp_path_factory):
    """A real session (several saves, so several segments, and a turn), its lock let go."""
    folder = tmp_path_factory.mktemp("template") / "light"
    conversation = Conversation(tiny, chunk_size=64)
    conversation.set_documents(TEXT)
    writer = SessionWriter(folder, documents=[{"source": "light.txt", "kind": "text", "title": "Light",
                                               "content_hash": "h", "segments": 1, "skipped": 0}])
    conversation.read(on_chunk=writer.save)
    "".join(conversation.ask("Who kept it?", Sampling(max_tokens=3)))
    writer.save(conversation)
    writer.close()
    return folder


def _copy(template: Path, root: Path, name: str = "light") -> Path:
    folder = root / name
    shutil.copytree(template, folder)
    return folder


def _resign(folder: Path, mutate) -> None:
    """Apply `mutate` to the manifest and write it back with a valid checksum, as an attacker would."""
    path = folder / "manifest.json"
    body = json.loads(path.read_text())
    body.pop("checksum")
    mutate(body)
    path.write_text(json.dumps({**body, "checksum": manifest_module._checksum(body)}))


def _one_line_session_error(call) -> str:
    with pytest.raises(SessionError) as failure:
        call()
    message = str(failure.value)
    assert "\n" not in message and message.strip(), message
    return message


def _loads_or_one_line(folder: Path, tiny) -> None:
    """The two acceptable outcomes: a load, or one SessionError line. Anything else fails the test."""
    try:
        read_manifest(folder)
    except SessionError as e:
        assert "\n" not in str(e)
    try:
        load_conversation(folder, tiny)
    except SessionError as e:
        assert "\n" not in str(e)
    listed = list_sessions(folder.parent)  # the listing shows it, usable or not, without raising
    assert [name for name, _, _ in listed] == [folder.name]


# every field the store or the CLI reads, each replaced by garbage of every JSON type, and deleted
FIELDS = [
    ("tokens",), ("document_tokens",), ("next_file",), ("created",), ("updated",), ("model",), ("model", "id"),
    ("model", "fingerprint"), ("model", "family"), ("model", "dtype"), ("model", "quant"),
    ("model", "long_context"), ("documents",), ("conversation",), ("conversation", "chunk_size"),
    ("conversation", "text_file"), ("conversation", "fed_text"), ("conversation", "fed_text_after_reading"),
    ("conversation", "pending_tokens"), ("conversation", "pending_sha256"), ("conversation", "turns"),
    ("cache",), ("cache", "meta"), ("cache", "meta", "position"), ("cache", "meta", "layers"),
    ("cache", "tensors"), ("files",),
]
GARBAGE = [None, "x", -1, 2**70, 1.5, True, [[[]]], {"a": {"b": []}}]
DELETE = object()


def _set(body: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        body = body[key]
    if value is DELETE:
        del body[path[-1]]
    else:
        body[path[-1]] = copy.deepcopy(value)


@pytest.mark.parametrize("field", FIELDS, ids=[".".join(f) for f in FIELDS])
def test_every_field_replaced_by_garbage_loads_or_is_one_line(tiny, template, tmp_path, field):
    for i, value in enumerate([*GARBAGE, DELETE]):
        folder = _copy(template, tmp_path / str(i))
        _resign(folder, lambda body, value=value: _set(body, field, value))
        _loads_or_one_line(folder, tiny)


def _first(body: dict, prefix: str) -> dict:
    return next(entry for name, entry in body["cache"]["tensors"].items() if name.startswith(prefix))


def _symlink_state_outside(folder: Path) -> None:
    state = next(folder.glob("state-*.safetensors"))
    outside = folder.parent / "outside.safetensors"
    shutil.copy(state, outside)  # same bytes, so only the link itself can give it away
    state.unlink()
    state.symlink_to(outside)


def _state_is_a_folder(folder: Path) -> None:
    state = next(folder.glob("state-*.safetensors"))
    state.unlink()
    state.mkdir()


def _nested_manifest(folder: Path) -> None:
    (folder / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)


def _manifest_is_a_link(folder: Path) -> None:
    outside = folder.parent / "elsewhere.json"
    shutil.copy(folder / "manifest.json", outside)
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").symlink_to(outside)


def _huge_header(folder: Path) -> None:
    """A tensor file whose header claims 2**60 bytes, with the manifest re-signed to match the file."""
    import hashlib

    kv = max(folder.glob("kv-*.safetensors"), key=lambda p: p.stat().st_size)
    data = bytearray(kv.read_bytes())
    data[:8] = (2**60).to_bytes(8, "little")
    kv.write_bytes(bytes(data))
    digest = "tree64m:" + hashlib.sha256(hashlib.sha256(bytes(data)).digest()).hexdigest()

    def mutate(body):
        body["files"][kv.name] = {"sha256": digest, "bytes": len(data)}
    _resign(folder, mutate)


def _text_file_is_a_list(folder: Path) -> None:
    import hashlib

    body = json.loads((folder / "manifest.json").read_text())
    text = folder / body["conversation"]["text_file"]
    data = b"[1, 2, 3]"
    text.write_bytes(data)
    digest = "tree64m:" + hashlib.sha256(hashlib.sha256(data).digest()).hexdigest()
    _resign(folder, lambda b: b["files"].__setitem__(text.name, {"sha256": digest, "bytes": len(data)}))


def _resigned(mutate):
    return lambda folder: _resign(folder, mutate)


CRAFTED = [
    ("unknown-cache-kind", _resigned(lambda b: b["cache"]["meta"]["layers"][0].__setitem__("kind", "quantum")),
     "kind"),
    ("format-version-2", _resigned(lambda b: b.__setitem__("version", 2)), "format version"),
    ("format-version-text", _resigned(lambda b: b.__setitem__("version", "1")), "format version"),
    ("not-a-session-format", _resigned(lambda b: b.__setitem__("format", "zip")), "is not a salachat session"),
    ("negative-segment-length", _resigned(lambda b: _first(b, "layers.0.keys")["segments"][0].__setitem__(
        "length", -5)), "outside"),
    ("absurd-shape", _resigned(lambda b: _first(b, "layers.0.keys").__setitem__("shape", [2, 2**40, 8])),
     "segments cover"),
    ("absurd-shape-consistent", _resigned(lambda b: (
        _first(b, "layers.0.keys").__setitem__("shape", [2, 2**40, 8]),
        _first(b, "layers.0.keys")["segments"][0].__setitem__(
            "length", 2**40 - sum(s["length"] for s in _first(b, "layers.0.keys")["segments"][1:])))),
     "claims"),
    ("segment-outside-folder", _resigned(lambda b: _first(b, "layers.0.keys")["segments"][0].__setitem__(
        "file", "../../outside.safetensors")), "not one of the session's tensor files"),
    ("file-with-absolute-path", _resigned(lambda b: b["files"].__setitem__("/etc/passwd", {
        "sha256": "0" * 64, "bytes": 1})), "not a file name a session holds"),
    ("text-file-outside", _resigned(lambda b: b["conversation"].__setitem__("text_file", "../text.json")),
     "text file"),
    ("state-file-is-a-link-out", _symlink_state_outside, "link"),
    ("state-file-is-a-folder", _state_is_a_folder, "link or a folder"),
    ("nested-manifest", _nested_manifest, "unreadable manifest"),
    ("manifest-is-a-link", _manifest_is_a_link, "not a salachat session"),
    ("infinite-tokens", _resigned(lambda b: b.__setitem__("tokens", float("inf"))), "tokens"),
    ("manifest-is-a-list", lambda f: (f / "manifest.json").write_text("[1]"), "unreadable manifest"),
    ("old-sparse-mode", _resigned(lambda b: (b["model"].pop("long_context"),
                                             b["model"].__setitem__("fingerprint", b["model"]["fingerprint"] +
                                                                    "+sparse"))), "older salachat"),
    ("other-topk", _resigned(lambda b: b["cache"]["meta"]["layers"][0].__setitem__("topk", 0)), "other settings"),
    ("missing-tensor", _resigned(lambda b: b["cache"]["tensors"].pop("layers.1.recurrent")), "lacks"),
    ("unknown-tensor", _resigned(lambda b: b["cache"]["tensors"].__setitem__(
        "layers.1.evil", copy.deepcopy(b["cache"]["tensors"]["layers.1.recurrent"]))), "unknown"),
    ("other-head-size", _resigned(lambda b: b["cache"]["tensors"]["layers.1.recurrent"].__setitem__(
        "shape", [1, 1, 1])), "this model's"),
    ("huge-safetensors-header", _huge_header, "header"),
    ("text-file-is-a-list", _text_file_is_a_list, "does not hold"),
    ("pieces-do-not-add-up", _resigned(lambda b: next(iter(b["files"].values())).update(
        {"sha256": "tree64m:" + "0" * 64, "pieces": ["1" * 64]})), "add up"),
    ("xxh3-pieces-do-not-add-up", _resigned(lambda b: next(iter(b["files"].values())).update(
        {"sha256": "xxh3tree64m:" + "0" * 32, "pieces": ["1" * 32]})), "add up"),
    ("pieces-of-another-hash", _resigned(lambda b: next(iter(b["files"].values())).update(
        {"sha256": "xxh3tree64m:" + "0" * 32, "pieces": ["1" * 64]})), "piece digest"),
    ("unknown-checksum-prefix", _resigned(lambda b: next(iter(b["files"].values())).__setitem__(
        "sha256", "blake3tree64m:" + "0" * 64)), "is not a checksum"),
    ("checksum-of-the-wrong-length", _resigned(lambda b: next(iter(b["files"].values())).__setitem__(
        "sha256", "xxh3tree64m:" + "0" * 64)), "is not a checksum"),
    ("zero-chunk-size", _resigned(lambda b: b["conversation"].__setitem__("chunk_size", 0)), "chunk_size"),
    ("turn-is-text", _resigned(lambda b: b["conversation"]["turns"].__setitem__(0, "hello")), "turns[0]"),
    ("more-pending-than-read", _resigned(lambda b: b["conversation"].__setitem__("pending_tokens", 10**9)),
     "does not match"),
    ("position-not-the-tokens", _resigned(lambda b: b["cache"]["meta"].__setitem__("position", 3)), "position"),
    ("layer-length-lies", _resigned(lambda b: b["cache"]["meta"]["layers"][1].__setitem__("length", 3)),
     "positions"),
    ("missing-file", lambda f: next(f.glob("kv-*.safetensors")).unlink(), "is missing"),
    ("bool-for-a-number", _resigned(lambda b: b.__setitem__("document_tokens", True)), "whole number"),
    ("both-fed-texts", _resigned(lambda b: b["conversation"].__setitem__("fed_text", "x")), "exactly one"),
]


@pytest.mark.parametrize("damage, expected", [(d, e) for _, d, e in CRAFTED], ids=[c[0] for c in CRAFTED])
def test_crafted_session_is_refused_in_one_line(tiny, template, tmp_path, damage, expected):
    folder = _copy(template, tmp_path)
    damage(folder)
    message = _one_line_session_error(lambda: load_conversation(folder, tiny))
    assert expected in message, message


def test_resume_never_opens_a_file_outside_its_folder(tiny, template, tmp_path, monkeypatch):
    """Every way a manifest can name a path (segments, files, the text file, a link) is refused before
    anything outside the session folder is opened."""
    import builtins

    opened = []
    real_open, real_os_open = builtins.open, os.open

    def spy(path, *args, **kwargs):
        opened.append(os.path.realpath(path) if isinstance(path, (str, os.PathLike)) else path)
        return real_open(path, *args, **kwargs)

    def os_spy(path, *args, **kwargs):
        opened.append(os.path.realpath(path))
        return real_os_open(path, *args, **kwargs)

    escapes = [c for c in CRAFTED if c[0] in ("segment-outside-folder", "file-with-absolute-path", "text-file-outside",
                                               "state-file-is-a-link-out", "manifest-is-a-link")]
    for i, (_, damage, _) in enumerate(escapes):
        folder = _copy(template, tmp_path / str(i))
        damage(folder)
        inside = os.path.realpath(folder)
        monkeypatch.setattr(builtins, "open", spy)
        monkeypatch.setattr(os, "open", os_spy)
        opened.clear()
        with pytest.raises(SessionError):
            load_conversation(folder, tiny)
        monkeypatch.undo()
        outside = [p for p in opened if isinstance(p, str) and not p.startswith(inside + os.sep)
                   and p.startswith(str(tmp_path))]
        assert not outside, outside


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not bind root")
def test_unreadable_files_are_one_line(tiny, template, tmp_path):
    folder = _copy(template, tmp_path)
    state = next(folder.glob("state-*.safetensors"))
    state.chmod(0)
    try:
        assert "cannot" in _one_line_session_error(lambda: load_conversation(folder, tiny))
        (folder / "manifest.json").chmod(0)
        assert "cannot read session" in _one_line_session_error(lambda: read_manifest(folder))
        folder.chmod(0)
        assert _one_line_session_error(lambda: SessionWriter(folder))
    finally:
        folder.chmod(0o700)
        state.chmod(0o600)
        (folder / "manifest.json").chmod(0o600)


def test_a_data_folder_that_is_a_file_is_one_line(tmp_path, monkeypatch):
    from salachat import paths
    from salachat.sessions import sessions_root

    blocker = tmp_path / "home"
    blocker.write_text("not a folder")
    monkeypatch.setattr(paths, "_override", None)
    monkeypatch.setenv("SALACHAT_HOME", str(blocker))
    with pytest.raises((SessionError, errors.UserError)) as failure:  # the data folder's own check may come first
        sessions_root()
    assert "data folder" in str(failure.value) and "\n" not in str(failure.value)


def test_sessions_are_private_whatever_the_umask(tiny, tmp_path, monkeypatch):
    from salachat import paths
    from salachat.sessions import session_folder, sessions_root

    monkeypatch.setattr(paths, "_override", None)
    monkeypatch.setenv("SALACHAT_HOME", str(tmp_path / "home"))
    old = os.umask(0)
    try:
        root = sessions_root()
        folder = session_folder(root, "open-book")
        conversation = Conversation(tiny, chunk_size=64)
        conversation.set_documents(TEXT)
        writer = SessionWriter(folder, documents=[])
        conversation.read(on_chunk=writer.save)
        writer.close()
    finally:
        os.umask(old)
    assert root.stat().st_mode & 0o777 == 0o700
    assert folder.stat().st_mode & 0o777 == 0o700
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes and set(modes.values()) == {0o600}, modes


def test_an_older_session_of_open_modes_becomes_private_when_opened(template, tmp_path):
    folder = _copy(template, tmp_path)
    for path in folder.iterdir():
        path.chmod(0o644)
    folder.chmod(0o755)
    SessionWriter(folder).close()
    assert folder.stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o600}


@pytest.mark.parametrize("name", ["book\n", "a/b", "..", ".hidden", "", "x" * 65, "a\x00b", "tab\there", "bücher",
                                  "-flag", "a\\b", " lead"])
def test_bad_session_names_are_refused(name):
    from salachat.sessions import check_session_name

    message = _one_line_session_error(lambda: check_session_name(name))
    assert "session name" in message


def test_good_session_names_pass():
    from salachat.sessions import check_session_name

    for name in ["book", "book-2024.v1_x", "A", "9" * 64]:
        assert check_session_name(name) == name


def test_manifest_records_quantisation_and_long_context_mode(template, tiny):
    from salachat.sessions import saved_model

    manifest = read_manifest(template)
    assert manifest["model"]["quant"] is None and manifest["model"]["long_context"] == "native"
    assert saved_model(manifest).long_context == tiny.long_context == "native"


def test_a_manifest_written_before_the_mode_fields_gets_defaults(template, tmp_path):
    from salachat.sessions import saved_model

    folder = _copy(template, tmp_path)
    _resign(folder, lambda b: (b["model"].pop("quant"), b["model"].pop("long_context"),
                               b["model"].__setitem__("fingerprint", b["model"]["fingerprint"] + "+nf4")))
    saved = saved_model(read_manifest(folder))
    assert (saved.quant, saved.long_context) == ("nf4", "native")


def test_crafted_sessions_through_the_entry_point_are_exit_5(salachat_cli, template):
    """The real `salachat` in a subprocess, on a few of the crafted sessions: one line, exit 5, no traceback."""
    root = salachat_cli.home / "sessions"
    root.mkdir(parents=True)
    for name, case in (("kind", "unknown-cache-kind"), ("escape", "segment-outside-folder"),
                       ("nested", "nested-manifest"), ("prefix", "unknown-checksum-prefix")):
        folder = _copy(template, root, name)
        next(d for n, d, _ in CRAFTED if n == case)(folder)
    for args, expected in ((("resume", "kind", "What?", "--max-tokens", "2"), "kind"),
                           (("resume", "escape", "What?", "--max-tokens", "2"), "tensor files"),
                           (("resume", "prefix", "What?", "--max-tokens", "2"), "is not a checksum"),
                           (("sessions", "show", "nested"), "unreadable manifest")):
        result = salachat_cli(*args, timeout=180)
        assert result.returncode == errors.NO_SESSION, (args, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert expected in result.stderr


def test_export_is_private_and_a_full_disk_or_a_missing_folder_is_one_line(tmp_path):
    from salachat.sessions import SessionSaveError
    from salachat.sessions.transcript import export_transcript

    old = os.umask(0)
    try:
        export_transcript(tmp_path / "t.md", "# Session light\n")
    finally:
        os.umask(old)
    assert (tmp_path / "t.md").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "t.md").read_text() == "# Session light\n"
    places = [tmp_path / "no" / "such" / "folder.md"] + ([Path("/dev/full")] if Path("/dev/full").exists() else [])
    for place in places:  # /dev/full: every write fails with "No space left on device"
        with pytest.raises(SessionSaveError) as failure:  # a failed write: exit 1, as a failed save
            export_transcript(place, "text")
        assert str(place) in str(failure.value) and "\n" not in str(failure.value)
