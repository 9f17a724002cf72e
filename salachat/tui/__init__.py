"""The Textual chat window (`salachat chat`, `salachat resume ID`): see app.py."""

from __future__ import annotations


def run(**options) -> int:
    """Open the chat window (keyword arguments: the fields of tui.app.Options); returns the exit code."""
    from salachat.tui.app import Options, SalaChat

    app = SalaChat(Options(**options))
    app.run()
    return app.return_code or 0
