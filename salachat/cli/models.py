"""`salachat models [list|show|rm|pull]`: the models salachat can run, where they are, how to get them."""

from typing import Annotated

import typer
from rich.text import Text

from salachat.cli import options as opt

models_app = typer.Typer(help="List, show, remove and install models.", invoke_without_command=True)
Name = Annotated[str, typer.Argument(metavar="NAME", help="A model name as `salachat models` lists it.")]


def _size(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def models_default(ctx: typer.Context) -> None:
    """Bare `salachat models` lists them."""
    if ctx.invoked_subcommand is None:
        models_list()


def models_list() -> None:
    """Known models and the models found on this machine (salachat's folder, the Hugging Face cache, LM Studio,
    Ollama), with what --model accepts for each."""
    from salachat import models
    from salachat.console import out

    found = models.list_models()
    listed = {info.name for info in found}
    for name, known in models.KNOWN_MODELS.items():
        if name in listed:
            continue
        default = " (default)" if name == models.DEFAULT_MODEL else ""
        out.print(Text.assemble((name, "bold"), f"{default}  {known.description}\n    not installed: "
                                f"{known.how_to_get}"))
    for info in found:
        default = " (default)" if info.name == models.DEFAULT_MODEL else ""
        context = f", {info.context_length:,} tokens trained" if info.context_length else ""
        quant = f" {info.quant}" if info.quant else ""
        out.print(Text.assemble((info.name, "bold"), f"{default}  {info.architecture}{quant}, "
                                f"{_size(info.size_bytes)}{context} ({info.source})\n    {info.path}"))


def models_show(name: Name) -> None:
    """One model: where it is, its architecture, size, quantisation and trained length."""
    from salachat import models
    from salachat.console import out

    info = models.show(name)
    for key, value in (("name", info.name), ("path", str(info.path)), ("source", info.source),
                       ("architecture", info.architecture), ("size", _size(info.size_bytes)),
                       ("weights", info.quant or "-"),
                       ("trained length", f"{info.context_length:,} tokens" if info.context_length else "-")):
        out.print(Text(f"{key}: {value}"))


def models_rm(name: Name) -> None:
    """Delete one of salachat's own models (those of other tools are left to them)."""
    from salachat import models
    from salachat.console import err

    freed = models.remove(name)
    err.print(Text(f"removed {name} ({_size(freed)} freed)"))


def models_pull(name: Annotated[str, typer.Argument(help="Model name, e.g. smollm2.")] = "smollm2") -> None:
    """Download a known model's weights into the models folder."""
    from salachat import models
    from salachat.console import err

    models.pull(name, log=lambda message: err.print(Text(message)))


def register(app: typer.Typer) -> None:
    models_app.callback()(opt.with_global_options(models_default))
    models_app.command("list")(opt.with_global_options(models_list))
    models_app.command("show")(opt.with_global_options(models_show))
    models_app.command("rm")(opt.with_global_options(models_rm))
    models_app.command("pull")(opt.with_global_options(models_pull))
    app.add_typer(models_app, name="models")
