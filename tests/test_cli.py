"""The real `salachat` entry point, in a subprocess: answers, JSON, and one clear line for bad input."""

import json

import pytest

SAMPLE = "assets/sample.pdf"


def test_help_lists_the_commands(salachat_cli):
    result = salachat_cli("--help")
    assert result.returncode == 0
    for command in ("ask", "models"):
        assert command in result.stdout


def test_models_list_says_how_to_install_the_default_model(salachat_cli):
    result = salachat_cli("models")
    assert result.returncode == 0
    assert "smollm2" in result.stdout and "salachat models pull smollm2" in result.stdout


def test_missing_model_gives_the_install_command(salachat_cli):
    result = salachat_cli("ask", SAMPLE, "Who kept the light?")
    assert result.returncode == 4
    assert "salachat models pull smollm2" in result.stderr
    assert "Traceback" not in result.stderr


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
def test_bad_input_is_one_line_and_exit_code_3(salachat_cli, smollm2_path, tmp_path, make_input, expected):
    path = make_input(tmp_path)
    result = salachat_cli("ask", path, "anything?", "--model", smollm2_path)
    assert result.returncode == 3, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


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
