"""Malformed usage, markup and file-system trouble through the real entry point (salachat.cli.main, in this
process: 50 subprocesses would cost a minute of CI): each case is one line on stderr, its documented exit
code and no traceback. The model is never needed: every case fails before it would load."""

import json
import os
import sys

import pytest

from salachat import errors

MARKUP = "[/x][bold]b[/bold][p.12]"
CONFIG_CASES = {
    "bad-toml": (b"model = \n", "not valid TOML"),
    "unknown-key": (b'modle = "smollm2"\n', "unknown key modle"),
    "unknown-sampling-key": (b"[sampling]\ntemprature = 1.0\n", "sampling.temprature"),
    "bad-temperature": (b'[sampling]\ntemperature = "hot"\n', "sampling.temperature"),
    "negative-max-tokens": (b"[sampling]\nmax_tokens = 0\n", "sampling.max_tokens"),
    "top-p-above-1": (b"[sampling]\ntop_p = 1.5\n", "sampling.top_p"),
    "model-not-a-string": (b"model = 5\n", "model = 5"),
    "bad-device": (b'device = "tpu"\n', "device = 'tpu'"),
    "bad-long-context": (b'long_context = "sometimes"\n', "long_context"),
    "bad-quant": (b'quant = "int3"\n', "quant = 'int3'"),
    "sampling-not-a-table": (b"sampling = 3\n", "sampling must be a table"),
    "not-utf8": (b'model = "\xff\xfe"\n', "not UTF-8"),
}


@pytest.fixture
def run(salachat_main):
    return salachat_main


def one_line(code, out, err, expected_code, *needles):
    assert code == expected_code, (code, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def story(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("Tomas Brandt kept the light for thirty-one years.\n")
    return path


USAGE = [
    (["--bogus"], "No such option: --bogus"),
    (["ask"], "Missing argument"),
    (["ask", "{story}"], "Missing argument"),
    (["ask", "{story}", "q", "--max-tokens", "zero"], "--max-tokens"),
    (["ask", "{story}", "q", "--max-tokens", "0"], "--max-tokens"),
    (["ask", "{story}", "q", "--temperature", "-1"], "--temperature"),
    (["ask", "{story}", "q", "--top-p", "2"], "--top-p"),
    (["ask", "{story}", "q", "--min-p", "-0.5"], "--min-p"),
    (["ask", "{story}", "q", "--seed", "1.5"], "--seed"),
    (["ask", "{story}", "q", "--quant", "int3"], "int8 or nf4"),
    (["ask", "{story}", "q", "--long-context", "maybe"], "--long-context maybe"),
    (["ask", "{story}", "q", "--dtype", "float8"], "--dtype float8"),
    (["ask", "{story}", "   "], "the question is empty"),
    (["ask", "-", "-", "q"], "standard input"),
    (["chat", "{story}", "--quant", "int3"], "int8 or nf4"),
    (["chat", "-"], "not -"),
    (["sessions", "frobnicate"], "No such command"),
    (["models", "show"], "Missing argument"),
    (["resume"], "Missing argument"),
    (["config", "nope"], "No such command"),
    (["--kv-gpu-gb", "-3", "sessions"], "--kv-gpu-gb"),
    (["sessions", "list", "--kv-gpu-gb", "lots"], "--kv-gpu-gb"),
    (["ask", "{story}", "q", f"--{MARKUP}"], f"--{MARKUP}"),
]


@pytest.mark.parametrize("args, needle", USAGE, ids=[" ".join(a)[:40] for a, _ in USAGE])
def test_usage_errors_are_one_line_and_exit_2(run, story, args, needle):
    args = [a.replace("{story}", str(story)) for a in args]
    one_line(*run(*args), errors.USAGE, needle)


def test_bare_salachat_shows_the_help_and_exits_2(run):
    code, out, err = run()
    assert code == errors.USAGE and "Usage: salachat" in err and "Traceback" not in err and out == ""


def test_help_and_version_exit_0(run):
    code, out, _ = run("--help")
    assert code == 0 and "ask" in out
    code, out, _ = run("--version")
    assert code == 0 and out.startswith("salachat ")


BAD_INPUT = [
    (lambda d: d / "missing.pdf", "missing.pdf: no such file or folder"),
    (lambda d: d / f"{MARKUP}.md", f"{MARKUP}.md: no such file or folder"),
    (lambda d: _write(d / "empty.txt", b""), "empty.txt"),
    (lambda d: _write(d / "binary.txt", b"text\x00\x01\x02" * 100), "binary.txt"),
    (lambda d: _write(d / "x.xyz", b"\x00\x01"), "x.xyz"),
    (lambda d: _write(d / "notes.gz", b"not gzip at all"), "notes.gz"),
    (lambda d: _write(d / "broken.pdf", b"%PDF-1.7 garbage"), "broken.pdf"),
    (lambda d: _write(d / "broken.epub", b"PK not a zip"), "broken.epub"),
]


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, needle", BAD_INPUT, ids=["missing", "markup-name", "empty", "binary", "unknown-kind",
                                                         "bad-gzip", "bad-pdf", "bad-epub"])
def test_unreadable_documents_are_one_line_and_exit_3(run, tmp_path, make, needle):
    one_line(*run("ask", make(tmp_path), "anything?"), errors.BAD_INPUT, needle)


def test_a_mistyped_path_is_refused_before_torch_is_imported(tmp_path):
    """In a fresh interpreter: the error comes before torch loads (which takes seconds)."""
    import subprocess

    probe = ("import sys\nfrom salachat import cli\nsys.argv = ['salachat', 'ask', 'missnig.pdf', 'q']\n"
             "try:\n    cli.main()\nexcept SystemExit as e:\n    code = e.code\n"
             "print(code, 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "SALACHAT_HOME": str(tmp_path / "home")})
    assert result.stdout.split() == ["3", "False"], result.stderr
    assert "missnig.pdf: no such file or folder" in result.stderr


def test_json_errors_are_one_object_on_stdout(run, tmp_path):
    code, out, err = run("ask", tmp_path / "missing.pdf", "q", "--json")
    assert code == errors.BAD_INPUT and "Traceback" not in err
    data = json.loads(out)
    assert data["error"]["code"] == 3 and "missing.pdf" in data["error"]["message"]
    assert data["error"]["kind"] == "bad_input"
    code, out, _ = run("ask", tmp_path / "missing.pdf", "q", "--json", "--top-p", "9")
    assert code == errors.USAGE and json.loads(out)["error"]["code"] == 2


@pytest.mark.parametrize("args, needle", [
    (["resume", "nosuch", "q"], "nosuch"),
    (["sessions", "show", "nosuch"], "nosuch"),
    (["sessions", "rm", "nosuch"], "nosuch"),
    (["sessions", "export", "nosuch"], "nosuch"),
    (["sessions", "rename", "nosuch", "other"], "nosuch"),
    (["sessions", "rename", "nosuch", "../x"], "session name"),
    (["sessions", "show", "../etc"], "session name"),
    (["sessions", "show", MARKUP], MARKUP),
    (["resume", "name\n", "q"], "session name"),
    (["ask", "{story}", "q", "--session", "bad/name"], "session name"),
    (["chat", "--session", MARKUP], MARKUP),
], ids=["resume-missing", "show-missing", "rm-missing", "export-missing", "rename-missing", "rename-bad-name", "dotdot", "markup-name", "newline",
        "ask-bad-name", "chat-markup-name"])
def test_missing_or_misnamed_sessions_are_one_line_and_exit_5(run, story, args, needle):
    args = [a.replace("{story}", str(story)) for a in args]
    one_line(*run(*args), errors.NO_SESSION, needle)


def test_a_damaged_manifest_is_one_line_and_does_not_hide_the_other_sessions(run, private_data_folder):
    junk = private_data_folder / "sessions" / "junk"
    junk.mkdir(parents=True)
    (junk / "manifest.json").write_text('{"format": "salachat-session", "title": "[/x]"')
    one_line(*run("sessions", "show", "junk"), errors.NO_SESSION, "junk")
    code, out, err = run("sessions")
    assert code == 0 and "junk" in out and "unusable" in out and "Traceback" not in err


@pytest.mark.parametrize("model, needle", [
    ("/nonexistent/model.gguf", "model.gguf"),
    ("nosuchmodel", "nosuchmodel"),
    (f"{MARKUP}.gguf", MARKUP),
], ids=["missing-path", "unknown-name", "markup-name"])
def test_missing_models_are_one_line_and_exit_4(run, story, model, needle):
    one_line(*run("ask", story, "q", "--model", model), errors.NO_MODEL, needle)


def test_a_garbage_gguf_is_one_line_and_exit_4(run, story, tmp_path):
    garbage = _write(tmp_path / "garbage.gguf", b"GGUF" + b"\xff" * 64)
    one_line(*run("ask", story, "q", "--model", garbage), errors.NO_MODEL, "garbage.gguf")


def test_models_show_and_rm_of_unknown_models_exit_4(run):
    one_line(*run("models", "show", "nosuch"), errors.NO_MODEL, "nosuch")
    one_line(*run("models", "rm", "nosuch"), errors.NO_MODEL, "nosuch")


def test_a_data_folder_that_is_a_file_is_named(run, tmp_path, monkeypatch):
    afile = _write(tmp_path / "afile", b"")
    one_line(*run("--data-dir", afile, "sessions"), errors.USAGE, "afile", "not a folder")
    one_line(*run("sessions", "list", "--data-dir", afile), errors.USAGE, "--data-dir")  # after the command
    one_line(*run("sessions", "--data-dir", afile), errors.USAGE, "--data-dir")  # after a bare group
    monkeypatch.setenv("SALACHAT_HOME", str(afile))
    one_line(*run("sessions"), errors.USAGE, "SALACHAT_HOME")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes whatever the permissions say")
def test_unreadable_files_and_folders_are_one_line(run, tmp_path, story):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0)
    try:
        one_line(*run("--data-dir", locked / "home", "sessions"), errors.FAILED, "locked")
    finally:
        os.chmod(locked, 0o700)
    os.chmod(story, 0)
    one_line(*run("ask", story, "q"), errors.BAD_INPUT, "story.txt")


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_a_bad_config_file_names_the_file_and_key_and_exits_2(run, tmp_path, name):
    content, needle = CONFIG_CASES[name]
    path = _write(tmp_path / "config.toml", content)
    one_line(*run("sessions"), errors.USAGE, str(path), needle)
    code, out, _ = run("config", "path")  # what helps fix it still works
    assert code == 0 and out.strip() == str(path)


def test_a_config_file_that_is_a_folder_is_named(run, tmp_path):
    (tmp_path / "config.toml").mkdir()
    one_line(*run("sessions"), errors.USAGE, "is a folder")


def test_config_show_reads_the_file(run, tmp_path):
    _write(tmp_path / "config.toml", b'model = "smollm2"\nlong_context = "on"\n[sampling]\ntemperature = 0.7\n')
    code, out, _ = run("config", "show", "--json")
    data = json.loads(out)
    assert code == 0 and data["exists"] and data["settings"] == {
        "model": "smollm2", "long_context": "on", "sampling": {"temperature": 0.7}}
    code, out, _ = run("config")
    assert code == 0 and 'model = "smollm2"' in out and "temperature = 0.7" in out


def test_flags_win_over_the_config_file_and_it_over_the_defaults(tmp_path):
    from salachat.engine.generate import Sampling

    from salachat import config
    from salachat.cli import options

    _write(tmp_path / "config.toml", b'device = "cpu"\nlong_context = "off"\n[sampling]\ntemperature = 0.7\n'
                                      b"max_tokens = 64\n")
    config.reset()
    chosen = options.settings(model="flag-model")
    assert chosen["model"] == "flag-model" and chosen["device"] == "cpu" and chosen["long_context"] == "off"
    assert options.settings(sparse=True)["long_context"] == "on"
    sampling = options.sampling(max_tokens=8)
    assert (sampling.max_tokens, sampling.temperature) == (8, 0.7)
    assert sampling.repeat_penalty == Sampling().repeat_penalty and sampling.min_p == Sampling().min_p


def test_every_command_lists_the_shared_options(run):
    for args, expected in [
        (["ask"], ["--model", "--device", "--top-p", "--seed", "--sparse", "--system", "--json", "--min-p",
                   "--repeat-penalty", "--dtype", "--data-dir", "--kv-gpu-gb"]),
        (["chat"], ["--model", "--device", "--top-p", "--seed", "--sparse", "--system", "--data-dir"]),
        (["resume"], ["--model", "--top-p", "--seed", "--json", "--data-dir", "--kv-gpu-gb"]),
        (["ingest"], ["--model", "--json", "--data-dir"]),
        (["sessions", "list"], ["--data-dir"]),
        (["sessions", "show"], ["--data-dir"]),
        (["models", "list"], ["--data-dir"]),
        (["models", "pull"], ["--data-dir"]),
        (["config", "show"], ["--data-dir"]),
        (["serve"], ["--model", "--data-dir", "--kv-gpu-gb"]),
    ]:
        code, out, _ = run(*args, "--help")
        assert code == 0, args
        missing = [option for option in expected if option not in out]
        assert not missing, (args, missing)


@pytest.mark.parametrize("data, needle", [(b"", "stdin"), (b"\x00\x01\x02" * 400, "stdin")],
                         ids=["empty-stdin", "binary-stdin"])
def test_a_bad_document_on_standard_input_is_one_line_and_exit_3(run, data, needle):
    one_line(*run("ask", "-", "q", stdin=data), errors.BAD_INPUT, needle)
