"""`rm` and `rename` respect a session another salachat has open: one SessionBusy line, nothing touched; once
that process is gone they work, and `rm` says what it frees."""

import subprocess
import sys
from pathlib import Path

import pytest

from salachat import errors
from salachat.sessions import SessionBusy, SessionError, remove_session, rename_session

ROOT = Path(__file__).resolve().parent.parent
# What a SessionWriter does when it opens a session (catalog.lock), without importing torch: quick to start.
HOLDER = ("import sys, time, pathlib\nfrom salachat.sessions.catalog import lock\n"
          "lock(pathlib.Path(sys.argv[1]))\nprint('held', flush=True)\ntime.sleep(120)\n")


def _fake_session(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    (folder / "kv-000000.safetensors").write_bytes(b"\0" * 100_000)
    (folder / "lock").write_text("")
    return folder


@pytest.fixture
def held(tmp_path):
    folder = _fake_session(tmp_path / "sessions", "book")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    yield folder, holder
    holder.kill()
    holder.wait()


def test_rm_and_rename_refuse_a_session_another_process_holds(held):
    folder, holder = held
    with pytest.raises(SessionBusy, match="open in another salachat"):
        remove_session(folder)
    with pytest.raises(SessionBusy, match="open in another salachat"):
        rename_session(folder.parent, "book", "renamed")
    assert (folder / "kv-000000.safetensors").stat().st_size == 100_000 and not (folder.parent / "renamed").exists()
    holder.kill()
    holder.wait()  # the OS drops the lock with the process, however it ends
    target = rename_session(folder.parent, "book", "renamed")
    assert target.is_dir() and not folder.exists()
    freed = remove_session(target)
    assert freed >= 100_000 and not target.exists()


def test_rm_of_a_missing_session_is_one_line(tmp_path):
    with pytest.raises(SessionError, match="no session named"):
        remove_session(tmp_path / "nothing")


def test_rm_through_the_entry_point_refuses_a_held_session(salachat_cli):
    folder = _fake_session(salachat_cli.home / "sessions", "book")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = salachat_cli("sessions", "rm", "book", timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == errors.NO_SESSION, result.stderr
    assert "open in another salachat" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and folder.is_dir()
