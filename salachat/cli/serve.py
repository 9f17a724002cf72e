"""`salachat serve`: the OpenAI-compatible server's command, which salachat/server/command.py declares."""

import typer

from salachat.cli import options as opt


def register(app: typer.Typer) -> None:
    from salachat.server.command import serve

    app.command()(opt.with_global_options(serve))
