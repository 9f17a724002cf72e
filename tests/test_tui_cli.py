"""`salachat chat` through the real entry point: bad input is one line and an exit code, before any window."""

from pathlib import Path

SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "sample.pdf"


def test_chat_help_lists_the_options(salachat_cli):
    helped = salachat_cli("chat", "--help")
    assert helped.returncode == 0 and "Open the chat window" in helped.stdout
    for option in ("--model", "--quant", "--device", "--session", "--max-tokens", "--temperature"):
        assert option in helped.stdout


def test_chat_refuses_bad_input_in_one_line_before_opening_the_window(salachat_cli):
    """A missing file (exit 3), no model installed (exit 4), a bad --quant (exit 2), a session that does not
    exist (exit 5): one line each, and no window (it would hang here, without a terminal)."""
    missing = salachat_cli("chat", "missing.pdf", timeout=60)
    assert missing.returncode == 3 and missing.stderr.strip().count("\n") == 0 and "missing.pdf" in missing.stderr
    no_model = salachat_cli("chat", str(SAMPLE), env={"SALACHAT_TEST_MODEL": ""}, timeout=60)
    assert no_model.returncode == 4 and "salachat models pull smollm2" in no_model.stderr
    assert no_model.stderr.strip().count("\n") == 0
    bad_quant = salachat_cli("chat", str(SAMPLE), "--quant", "int3", timeout=60)
    assert bad_quant.returncode == 2 and "int8 or nf4" in bad_quant.stderr
    no_session = salachat_cli("resume", "nosuch", timeout=60)
    assert no_session.returncode == 5 and "Traceback" not in no_session.stderr and "nosuch" in no_session.stderr
