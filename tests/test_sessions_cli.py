"""Sessions through the real `salachat` entry point: ask --session reads once, resume answers without reading
again, list/show/export/rm, and a reading stopped by Ctrl-C continues from its last checkpoint."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from salachat import errors

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
STORY = ("The harbour light of Varna Point was built in 1871. Tomas Brandt kept the light for thirty-one years. "
         "His daughter Ilse wrote the log in green ink. The lamp burned whale oil until 1903.\n")


def test_ask_session_then_resume_answers_without_reading_again(salachat_cli, smollm2_path, tmp_path):
    story = tmp_path / "light.txt"
    story.write_text(STORY)
    first = salachat_cli("ask", story, "Who kept the light?", "--session", "light", "--model", smollm2_path,
                         "--json", "--max-tokens", "12")
    assert first.returncode == 0, first.stderr
    read = json.loads(first.stdout)["document_tokens"]
    assert read > 50

    listing = salachat_cli("sessions")
    assert listing.returncode == 0 and "light" in listing.stdout and "1 questions" in listing.stdout

    again = salachat_cli("resume", "light", "In which year was it built?", "--json", "--max-tokens", "12")
    assert again.returncode == 0, again.stderr
    data = json.loads(again.stdout)
    assert set(data) == set(json.loads(first.stdout))  # one --json schema for ask and resume
    assert data["session"] == "light" and data["long_context"] == "dense" and data["context_limit"] == 8192
    assert data["prompt_tokens"] < read / 2  # only the new question was fed, not the documents
    assert data["context_tokens"] > read and "continuing the reading" not in again.stderr

    shown = salachat_cli("sessions", "show", "light")
    assert "light.txt" in shown.stdout and "1. Who kept the light?" in shown.stdout
    assert "2. In which year was it built?" in shown.stdout
    markdown = salachat_cli("sessions", "export", "light")
    assert markdown.stdout.startswith("# Session light") and "## Q: In which year was it built?" in markdown.stdout
    exported = json.loads(salachat_cli("sessions", "export", "light", "--json").stdout)
    assert [t["question"] for t in exported["turns"]] == ["Who kept the light?", "In which year was it built?"]
    assert exported["turns"][1]["answer"] == data["answer"]

    removed = salachat_cli("sessions", "rm", "light")
    assert removed.returncode == 0 and not (salachat_cli.home / "sessions" / "light").exists()
    assert salachat_cli("resume", "light", "?").returncode == errors.NO_SESSION


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from sala_tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("sala") / "tiny")


def test_reading_stopped_by_ctrl_c_continues_from_its_checkpoint(salachat_cli, tiny_folder, tmp_path):
    story = tmp_path / "long.txt"
    story.write_text(STORY * 50)  # byte tokens: ~9,700 tokens, ~19 chunks, seconds of reading
    env = {"SALACHAT_HOME": str(salachat_cli.home), "COLUMNS": "120"}
    # A shell without job control starts background jobs with SIGINT ignored, and Python keeps that: give the
    # child the handler a terminal gives it, so that Ctrl-C becomes KeyboardInterrupt as for a user.
    launcher = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "runpy.run_module('salachat', run_name='__main__')")
    child = subprocess.Popen(
        [sys.executable, "-c", launcher, "ask", str(story), "Who?", "--session", "long", "--model",
         str(tiny_folder), "--max-tokens", "6", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE.parent, env={**os.environ, **env})
    manifest = salachat_cli.home / "sessions" / "long" / "manifest.json"
    deadline = time.time() + 120
    while not manifest.exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == errors.INTERRUPTED, stderr
    assert "salachat resume long" in stderr and "Traceback" not in stderr
    left = json.loads(manifest.read_text())["conversation"]["pending_tokens"]
    assert left > 0, "the reading finished before Ctrl-C: make the document longer"

    resumed = salachat_cli("resume", "long", "Who?", "--max-tokens", "6", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{left:,} tokens left" in resumed.stderr
    straight = salachat_cli("ask", story, "Who?", "--session", "straight", "--model", tiny_folder,
                            "--max-tokens", "6", "--json")
    a, b = json.loads(resumed.stdout), json.loads(straight.stdout)
    assert a["answer"] == b["answer"] and a["context_tokens"] == b["prompt_tokens"] + b["document_tokens"] + \
        b["generated_tokens"]
    exported = json.loads(salachat_cli("sessions", "export", "long", "--json").stdout)
    assert exported["reading_complete"] and exported["turns"][0]["answer"] == b["answer"]


def test_ask_session_continues_same_documents_refuses_others(salachat_cli, tiny_folder, tmp_path):
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    one.write_text(STORY)
    two.write_text(STORY.replace("1871", "1902"))
    assert salachat_cli("ask", one, "Who?", "-s", "s", "--model", tiny_folder, "--max-tokens", "2").returncode == 0
    result = salachat_cli("ask", two, "Who?", "-s", "s", "--model", tiny_folder, "--max-tokens", "2")
    assert result.returncode == errors.NO_SESSION and "holds other documents" in result.stderr
    same = salachat_cli("ask", one, "And when?", "-s", "s", "--model", tiny_folder, "--max-tokens", "2")
    assert same.returncode == 0
    assert "2 questions" in salachat_cli("sessions", "list").stdout
    if importlib.util.find_spec("salachat.tui") is None:  # without a question, resume opens the chat window
        chat = salachat_cli("resume", "s")
        assert chat.returncode == errors.USAGE and "chat window" in chat.stderr
        assert len(chat.stderr.strip().splitlines()) == 1


def test_sessions_on_an_empty_home_say_how_to_make_one(salachat_cli):
    result = salachat_cli("sessions")
    assert result.returncode == 0 and "--session NAME" in result.stderr


def test_markup_in_titles_questions_and_answers_prints_as_typed(salachat_main, tiny_folder, tmp_path):
    """A Markdown heading, a file name and a question holding Rich markup: saved, listed, shown and exported
    as typed (one such title once broke `sessions list` for every session)."""
    document = tmp_path / "[bold]notes[red].md"
    document.write_text("# [/x] The [bold]Light[/bold]\n\n" + STORY)
    question = "What is [p.12] and [/x]?"
    code, out, err = salachat_main("ask", document, question, "--session", "marked", "--model", tiny_folder,
                                   "--max-tokens", "3")
    assert code == 0 and "Traceback" not in err and "MarkupError" not in err
    code, out, err = salachat_main("sessions", "list")
    assert code == 0 and "marked  [/x] The [bold]Light[/bold]" in out
    code, out, _ = salachat_main("sessions", "show", "marked")
    assert code == 0 and f"1. {question}" in out and "[bold]notes[red].md" in out
    code, out, _ = salachat_main("sessions", "export", "marked")
    assert code == 0 and question in out
    code, _, err = salachat_main("sessions", "rename", "marked", "plain")
    assert code == 0 and "renamed session 'marked' to 'plain'" in err
    assert salachat_main("sessions", "show", "plain")[0] == 0 and salachat_main("sessions", "show", "marked")[0] == 5
