"""The `salachat` command line: thin faces over salachat.chat.ChatSession and the other libraries.

One module a command group (ask, ingest, chat, sessions + resume, models, config, serve), options declared
once in options.py, and one error path: whatever a command raises goes through salachat.errors.classify to
one line on stderr (and, with --json, one JSON object on stdout) and a documented exit code.
"""

import sys
from pathlib import Path
from typing import Annotated

import typer

from salachat import errors
from salachat.cli import options as opt

app = typer.Typer(
    name="salachat",
    help="Ask questions about very long documents (books, PDFs, code repositories), locally.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts and values are printed as typed: "[p.12]" is not markup
)


def _version(shown: bool) -> None:
    if shown:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"salachat {version('salachat')}")
        except PackageNotFoundError:  # a source checkout that was never installed
            print("salachat (not installed)")
        raise typer.Exit(0)


@app.callback()
def main_options(ctx: typer.Context, data_dir: opt.DataDir = None, kv_gpu_gb: opt.KvGpuGb = None,
                 version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version,
                                                       help="Print salachat's version.")] = False) -> None:
    opt.apply_globals(data_dir, kv_gpu_gb)
    if ctx.invoked_subcommand != "config":  # a broken config file is named at once (`config` helps fix it)
        from salachat import config

        config.current()


def _register() -> None:
    from salachat.cli import ask, chat, config, ingest, models, serve, sessions

    for module in (ask, ingest, sessions, chat, models, config, serve):
        module.register(app)


_register()


def _wants_json(argv: list[str]) -> bool:
    options = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in options


def run(argv: list[str] | None = None) -> int:
    """Run one command line; the exit code. Nothing escapes as a traceback (SALACHAT_DEBUG=1 shows those of
    unexpected errors)."""
    from salachat.cli.output import print_error

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = app(args=argv, prog_name="salachat", standalone_mode=False)
        # Typer turns Ctrl-C into a bare return of 130 when not in standalone mode
        if isinstance(code, int) and code != 0:
            if code == errors.INTERRUPTED:
                print_error(errors.Failure(code, "stopped.", True), _wants_json(argv))
            return code
        return 0
    except SystemExit as e:  # typer.Exit and the like
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # noqa: BLE001 - the one place where every failure becomes one line
        if type(e).__name__ == "Exit" and isinstance(getattr(e, "exit_code", None), int):
            if e.exit_code == errors.INTERRUPTED:  # Ctrl-C, as Typer reports it out of standalone mode
                print_error(errors.Failure(errors.INTERRUPTED, "stopped.", True), _wants_json(argv))
            return e.exit_code  # click's / typer's Exit (e.g. --help)
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `salachat`: the help, then exit 2
            _show_help(e)
            return errors.USAGE
        failure = errors.classify(e)
        if not failure.expected and errors.debug():
            import traceback

            traceback.print_exc()
        ctx = getattr(e, "ctx", None)
        if failure.code == errors.USAGE and ctx is not None and hasattr(ctx, "command_path"):
            failure = errors.Failure(failure.code, f"{failure.message} (`{ctx.command_path} --help` lists the "
                                     "options)", True)
        print_error(failure, _wants_json(argv))
        return failure.code


def _show_help(error) -> None:
    ctx = getattr(error, "ctx", None)
    if ctx is not None:
        print(ctx.get_help(), file=sys.stderr)


def main() -> None:
    try:
        code = run()
    finally:
        from salachat.cli.output import flush_quietly

        flush_quietly()
    sys.exit(code)


__all__ = ["Path", "app", "main", "run"]
