"""The Textual chat window (`salachat chat`, `salachat resume ID`): see app.py."""

from __future__ import annotations

from pathlib import Path


def run(paths: list[Path] | None = None, session_id: str | None = None, model: str | None = None,
        device: str = "auto", quant: str | None = None, max_tokens: int = 512, temperature: float = 0.0) -> int:
    """Open the chat window on documents and/or a session; returns the exit code."""
    from salachat.tui.app import Options, SalaChat

    options = Options(paths=list(paths or []), session=session_id, model=model, device=device, quant=quant,
                      max_tokens=max_tokens, temperature=temperature)
    app = SalaChat(options)
    app.run()
    return app.return_code or 0
