"""`salachat config path|show`: where the config file is and what salachat reads from it."""

import json

import typer
from rich.text import Text

from salachat.cli import options as opt

config_app = typer.Typer(help="The config file: defaults for the model, device, sampling, long-context mode "
                              "and data folder.", invoke_without_command=True)


def config_default(ctx: typer.Context) -> None:
    """Bare `salachat config` shows it."""
    if ctx.invoked_subcommand is None:
        config_show()


def config_path() -> None:
    """The config file's path (it need not exist)."""
    from salachat import config

    print(config.config_path())


def config_show(as_json: opt.Json = False) -> None:
    """The settings the config file holds, checked (a bad key is named, exit 2), and the data folder in use."""
    from salachat import config
    from salachat.console import err, out
    from salachat.paths import data_dir

    path = config.config_path()
    settings = config.current().to_dict()
    if as_json:
        print(json.dumps({"path": str(path), "exists": path.is_file(), "settings": settings,
                          "data_dir": str(data_dir())}, ensure_ascii=False))
        return
    if not path.is_file():
        err.print(Text(f"no config file at {path}: salachat's defaults apply (see the README for the keys)"))
    else:
        out.print(Text(f"# {path}", style="dim"))
    for key, value in settings.items():
        if key == "sampling":
            continue
        out.print(Text(f"{key} = {json.dumps(value, ensure_ascii=False)}"))
    if settings["sampling"]:
        out.print(Text("[sampling]"))
        for key, value in settings["sampling"].items():
            out.print(Text(f"{key} = {json.dumps(value)}"))
    out.print(Text(f"# data folder in use: {data_dir()}", style="dim"))


def register(app: typer.Typer) -> None:
    config_app.callback()(opt.with_global_options(config_default))
    config_app.command("path")(opt.with_global_options(config_path))
    config_app.command("show")(opt.with_global_options(config_show))
    app.add_typer(config_app, name="config")
