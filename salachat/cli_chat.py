"""`salachat chat [PATH…]`: the chat window. Bad paths and a missing model are refused before it opens."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from salachat import errors
from salachat.errors import UserError


def chat(
    paths: Annotated[list[Path] | None, typer.Argument(help="Documents or folders to talk about.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="A known model name, a GGUF file or a Hugging Face folder.")] = None,
    quant: Annotated[str | None, typer.Option("--quant", help="Quantise weights on load: int8 or nf4.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")] = "auto",
    session: Annotated[str | None, typer.Option("--session", "-s", help="Save as (or continue) this session.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Longest answer, in tokens.")] = 512,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")] = 0.0,
) -> None:
    """Open the chat window (Esc stops, Ctrl+O sessions, Ctrl+Q quits)."""
    from salachat.engine import registry

    for path in paths or []:
        if not path.exists():
            raise UserError(f"{path}: no such file or folder", errors.BAD_INPUT)
    from salachat.cli import check_quant

    check_quant(quant)
    if model is None and not registry.locate(registry.DEFAULT_MODEL):
        raise UserError(f"the default model is not installed: run `salachat models pull {registry.DEFAULT_MODEL}`",
                        errors.NO_MODEL)
    from salachat import tui

    code = tui.run(paths=paths or [], session_id=session, model=model, device=device, quant=quant,
                   max_tokens=max_tokens, temperature=temperature)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command()(chat)
