"""The real `salachat` entry point: answers and JSON in a subprocess, as a user runs it; its quick refusals
in process (salachat_main), which costs no interpreter start."""

import json

import pytest

SAMPLE = "assets/sample.pdf"


def test_help_lists_the_commands(salachat_main):
    code, out, _ = salachat_main("--help")
    assert code == 0
    for command in ("ask", "ingest", "chat", "resume", "sessions", "models", "config", "serve"):
        assert command in out


def test_models_list_says_how_to_install_the_default_model(salachat_main):
    code, out, _ = salachat_main("models")
    assert code == 0
    assert "smollm2" in out and "salachat models pull smollm2" in out


def test_missing_model_gives_the_install_command(salachat_main):
    code, _, err = salachat_main("ask", SAMPLE, "Who kept the light?")
    assert code == 4
    assert "salachat models pull smollm2" in err
    assert "Traceback" not in err


def _file(name: str, content: bytes):
    def make(folder):
        (folder / name).write_bytes(content)
        return folder / name

    return make


@pytest.mark.parametrize(
    "make_input, expected",
    [
        (lambda d: d / "nope.pdf", "nope.pdf"),
        (_file("x.xyz", b"\x00\x01"), "x.xyz"),
        (_file("empty.pdf", b""), "empty.pdf"),
    ],
    ids=["missing-file", "unsupported-type", "empty-pdf"],
)
def test_bad_input_is_one_line_and_exit_code_3(salachat_main, smollm2_path, tmp_path, make_input, expected):
    path = make_input(tmp_path)
    code, _, err = salachat_main("ask", path, "anything?", "--model", smollm2_path)
    assert code == 3, err
    assert expected in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_ask_answers_about_the_sample_as_json(salachat_cli, smollm2_path):
    result = salachat_cli(
        "ask", SAMPLE, "Who kept the light for thirty-one years?", "--model", smollm2_path,
        "--json", "--max-tokens", "40",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert "Brandt" in data["answer"]
    assert data["prompt_tokens"] > 0 and data["generated_tokens"] > 0
    assert data["documents"][0]["kind"] == "pdf"
    assert not list((salachat_cli.home / "models").glob("*/*.gguf"))  # nothing written where not asked


def test_ask_streams_the_answer_to_stdout(salachat_cli, smollm2_path):
    result = salachat_cli("ask", SAMPLE, "In which year was the light built?", "--model", smollm2_path,
                          "--max-tokens", "30")
    assert result.returncode == 0, result.stderr
    assert "1871" in result.stdout


def test_ingest_shows_what_would_be_read_without_the_model(salachat_cli, smollm2_path):
    result = salachat_cli("ingest", SAMPLE, "engine", "--model", smollm2_path, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    kinds = [d["kind"] for d in data["documents"]]
    assert kinds == ["pdf", "repo"]
    assert data["documents"][0]["pages"] == 5
    assert data["tokens_exact"] and data["tokens"] == sum(d["tokens"] for d in data["documents"])
    text = salachat_cli("ingest", SAMPLE, "--model", smollm2_path)
    assert "5 pages" in text.stdout and "tokens" in text.stdout


def _installed_salachat() -> list[str]:
    """The console script a fresh install puts beside the interpreter (`python -m salachat` where absent)."""
    import shutil
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "salachat"
    if script.is_file():
        return [str(script)]
    found = shutil.which("salachat")
    return [found] if found else [sys.executable, "-m", "salachat"]


@pytest.mark.parametrize("args", [[], ["--frobnicate"], ["ask", "x.pdf", "q", "--max-tokens", "zero"]],
                         ids=["no-arguments", "unknown-flag", "bad-value"])
def test_the_installed_entry_point_exits_2_on_usage_errors(tmp_path, args):
    """What `typer` installs today raises exceptions of its own bundled click: they are usage errors too."""
    import os
    import subprocess

    result = subprocess.run([*_installed_salachat(), *args], capture_output=True, text=True, timeout=60,
                            check=False, env={**os.environ, "SALACHAT_HOME": str(tmp_path / "home")})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    if args:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    else:
        assert "Usage: salachat" in result.stderr


def test_answers_citations_and_notes_print_as_typed(capsys):
    from types import SimpleNamespace

    from salachat.cli import output
    from salachat.errors import Failure

    text = "See [p.12] and [/x] and [bold]this[/bold]."
    assert output.stream(iter(["See [p.12] ", "and [/x] and [bold]this[/bold]."]), as_json=False) == text
    output.cited([SimpleNamespace(source="[/x]book.pdf", text="[p.3] Tomas [red]Brandt[/red]")])
    output.note("[/x] note")
    output.print_error(Failure(3, "[/x].md: no such file", True))
    captured = capsys.readouterr()
    assert captured.out == text + "\n"
    for shown in ("── [/x]book.pdf", "[p.3] Tomas [red]Brandt[/red]", "[/x] note", "error: [/x].md: no such file"):
        assert shown in captured.err
