"""`salachat chat [PATH…]`: the chat window. Bad paths, options and a missing model are refused before it
opens, with the same one line and exit code as every command."""

from typing import Annotated

import typer

from salachat.cli import options as opt


def chat(
    paths: Annotated[list[str] | None, typer.Argument(help="Documents or folders to talk about.",
                                                         show_default=False)] = None,
    model: opt.Model = None,
    quant: opt.Quant = None,
    dtype: opt.Dtype = None,
    device: opt.Device = None,
    sparse: opt.Sparse = False,
    long_context: opt.LongContext = None,
    session: opt.Session = None,
    password: opt.Password = None,
    system: opt.System = None,
    max_tokens: opt.MaxTokens = None,
    temperature: opt.Temperature = None,
    top_p: opt.TopP = None,
    min_p: opt.MinP = None,
    repeat_penalty: opt.RepeatPenalty = None,
    seed: opt.Seed = None,
    engine: opt.Engine = None,
) -> None:
    """Open the chat window (Esc stops, Ctrl+O sessions, Ctrl+Q quits)."""
    from pathlib import Path

    paths = [Path(p) for p in paths or []]
    if any(str(p) == "-" for p in paths):
        from salachat.errors import UsageError

        raise UsageError("the chat window reads its keys from the terminal: pass documents as files, not -")
    opt.check_paths(paths)
    if session is not None:
        from salachat.sessions import check_name

        check_name(session)
    chosen = opt.settings(model=model, device=device, quant=quant, dtype=dtype, long_context=long_context,
                          sparse=sparse, system=system)
    sampling = opt.sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, seed=seed)
    if engine is None:
        _check_model(chosen["model"])
    open_window(paths=paths, session=session, sampling=sampling, password=password, engine=engine, **chosen)


def _check_model(spec: str | None) -> None:
    """The model exists (ModelLoadError, exit 4, otherwise): the window would only show it after opening."""
    from salachat import models

    models.resolve(spec)


def open_window(**kwargs) -> None:
    from salachat import tui

    code = tui.run(**kwargs)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command()(opt.with_global_options(chat))
