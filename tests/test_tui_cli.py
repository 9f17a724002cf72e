"""`salachat chat` through the real entry point: bad input is one line and an exit code, before any window."""

from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "sample.pdf"


def test_chat_help_lists_the_options(salachat_main):
    code, out, _ = salachat_main("chat", "--help")
    assert code == 0 and "Open the chat window" in out
    for option in ("--model", "--quant", "--device", "--session", "--max-tokens", "--temperature", "--top-p",
                   "--seed", "--sparse", "--engine"):
        assert option in out


def test_chat_refuses_bad_input_in_one_line_before_opening_the_window(salachat_main, monkeypatch):
    """A missing file (exit 3), no model installed (exit 4), a bad --quant (exit 2), a session that does not
    exist (exit 5): one line each, and no window (it would hang here, without a terminal)."""
    from salachat import tui

    monkeypatch.setattr(tui, "run", lambda **_: pytest.fail("the window opened"))
    code, _, err = salachat_main("chat", "missing.pdf")
    assert code == 3 and err.strip().count("\n") == 0 and "missing.pdf" in err
    code, _, err = salachat_main("chat", str(SAMPLE))  # the test's data folder has no model installed
    assert code == 4 and "salachat models pull smollm2" in err and err.strip().count("\n") == 0
    code, _, err = salachat_main("chat", str(SAMPLE), "--quant", "int3")
    assert code == 2 and "int8 or nf4" in err
    code, _, err = salachat_main("resume", "nosuch")
    assert code == 5 and "Traceback" not in err and "nosuch" in err
