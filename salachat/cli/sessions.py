"""`salachat sessions [list|show|rm|export]` and `salachat resume ID [QUESTION]`."""

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from salachat.cli import options as opt

sessions_app = typer.Typer(help="List, show, remove and export saved sessions.", invoke_without_command=True)
Id = Annotated[str, typer.Argument(metavar="ID", help="The session's name, as given to --session.")]


def _folder(name: str) -> Path:
    from salachat.sessions import session_folder, sessions_root

    return session_folder(sessions_root(), name)


def _manifest(name: str) -> dict:
    from salachat.sessions import read_manifest

    return read_manifest(_folder(name))


def resume(
    session_id: Id,
    question: Annotated[
        str | None, typer.Argument(metavar="QUESTION", help="Ask this; without it, open the chat window.")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="The model, if it moved since.")] = None,
    device: opt.Device = None,
    max_tokens: opt.MaxTokens = None,
    temperature: opt.Temperature = None,
    top_p: opt.TopP = None,
    min_p: opt.MinP = None,
    repeat_penalty: opt.RepeatPenalty = None,
    seed: opt.Seed = None,
    engine: opt.Engine = None,
    as_json: opt.Json = False,
) -> None:
    """Continue a saved session: finish an interrupted reading, then answer QUESTION (or open the chat)."""
    from salachat import config

    if engine is None:
        _manifest(session_id)  # a missing or damaged session is reported before the model loads
    else:  # the session is the server's
        from salachat.sessions import check_name

        check_name(session_id)
    device = device or config.current().device or "auto"
    sampling = opt.sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, seed=seed)
    if question is None:  # the window loads the model and finishes any interrupted reading, with progress
        from salachat.cli.chat import open_window

        open_window(session=session_id, model=model, device=device, sampling=sampling, engine=engine)
        return
    if engine is not None:
        from salachat.cli.ask import answer_with
        from salachat.remote import RemoteSession

        answer_with(RemoteSession.resume(engine, session_id), question, sampling, as_json)
        return
    from salachat.chat import ChatSession
    from salachat.cli import output
    from salachat.cli.ask import answer_with
    from salachat.console import err

    t0 = time.perf_counter()
    with err.status(Text(f"loading session {session_id} …")):
        chat = ChatSession.resume(session_id, model=model, device=device,
                                  on_note=None if as_json else output.note)
    if chat.pending_tokens and as_json:  # the line is worth having on stderr with --json too
        output.note(f"continuing the reading of session {session_id!r}: {chat.pending_tokens:,} tokens left")
    answer_with(chat, question, sampling, as_json, load_seconds=time.perf_counter() - t0)


def sessions_default(ctx: typer.Context) -> None:
    """Bare `salachat sessions` lists them."""
    if ctx.invoked_subcommand is None:
        sessions_list()


def sessions_list() -> None:
    """Saved sessions, newest first: documents, model, context size, state."""
    from salachat.console import err, out
    from salachat.paths import sessions_dir
    from salachat.sessions import list_sessions

    found = list_sessions(sessions_dir())
    if not found:
        err.print(Text('no sessions yet: `salachat ask FILE "question" --session NAME` saves one'))
    for name, manifest, problem in found:
        if manifest is None:
            out.print(Text.assemble((name, "bold"), "  ", ("unusable: ", "red"), str(problem)))
            continue
        try:
            titles = ", ".join(str(d.get("title") or d.get("source") or "?") for d in manifest["documents"])
            state = "reading interrupted" if manifest["conversation"]["pending_tokens"] else \
                f"{len(manifest['conversation']['turns'])} questions"
            text = (f"  {titles or 'no documents'}  {manifest['tokens']:,} tokens, {state}, "
                    f"{manifest['model']['id']}, {manifest['updated']}")
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # one bad manifest never hides the others
            out.print(Text.assemble((name, "bold"), "  ", ("unusable: ", "red"), f"malformed manifest ({e})"))
            continue
        out.print(Text.assemble((name, "bold"), text))


def sessions_show(session_id: Id) -> None:
    """A session's documents, model, size on disk and questions."""
    from salachat.console import out

    manifest = _manifest(session_id)
    disk = sum(f["bytes"] for f in manifest["files"].values())
    saved = manifest["conversation"]
    model = manifest["model"]
    out.print(Text.assemble((session_id, "bold"), f"  created {manifest['created']}, updated {manifest['updated']}"))
    extra = ", ".join(f"{k} {model[k]}" for k in ("quant", "long_context") if model.get(k))
    out.print(Text(f"model: {model['id']} (fingerprint {model['fingerprint']}, {model['dtype']}"
                   + (f", {extra}" if extra else "") + ")"))
    for d in manifest["documents"]:
        out.print(Text(f"document: {d.get('source')} ({d.get('kind')}) {d.get('title')!r}"))
    reading = f", {saved['pending_tokens']:,} left to read" if saved["pending_tokens"] else ""
    out.print(Text(f"context: {manifest['tokens']:,} tokens ({manifest['document_tokens']:,} of documents{reading}); "
                   f"on disk {disk / 2**20:,.1f} MiB in {len(manifest['files'])} files"))
    for i, turn in enumerate(saved["turns"], 1):
        out.print(Text(f"{i}. {turn['question']}"))


def sessions_rm(session_id: Id) -> None:
    """Delete a session (its folder under the data folder)."""
    from salachat.console import err
    from salachat.sessions import remove_session

    freed = remove_session(_folder(session_id))
    size = f" ({freed / 2**20:,.1f} MiB freed)" if isinstance(freed, int) and not isinstance(freed, bool) else ""
    err.print(Text(f"removed session {session_id!r}{size}"))


def sessions_rename(old: Id, new: Annotated[str, typer.Argument(metavar="NEW", help="The new name.")]) -> None:
    """Rename a session (refused while another salachat has it open)."""
    from salachat.console import err
    from salachat.sessions import rename_session, sessions_root

    rename_session(sessions_root(), old, new)
    err.print(Text(f"renamed session {old!r} to {new!r}"))


def sessions_export(
    session_id: Id,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of Markdown.")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file, not stdout.")] = None,
) -> None:
    """The transcript: Markdown (default) or JSON."""
    from salachat.console import err
    from salachat.sessions.transcript import transcript_json, transcript_markdown

    manifest = _manifest(session_id)
    text = transcript_json(session_id, manifest) if as_json else transcript_markdown(session_id, manifest)
    text = text if text.endswith("\n") else text + "\n"
    if output is None:
        print(text, end="")
        return
    try:
        from salachat.sessions.transcript import export_transcript

        export_transcript(output, text)  # 0600, and a full disk or an unwritable place is one line
    except OSError as e:
        from salachat.errors import UserError

        raise UserError(f"{output}: cannot write the transcript ({e.strerror or e})") from None
    err.print(Text(f"wrote {output}"))


def register(app: typer.Typer) -> None:
    sessions_app.callback()(opt.with_global_options(sessions_default))
    sessions_app.command("list")(opt.with_global_options(sessions_list))
    sessions_app.command("show")(opt.with_global_options(sessions_show))
    sessions_app.command("rm")(opt.with_global_options(sessions_rm))
    sessions_app.command("rename")(opt.with_global_options(sessions_rename))
    sessions_app.command("export")(opt.with_global_options(sessions_export))
    app.add_typer(sessions_app, name="sessions")
    app.command("resume")(opt.with_global_options(resume))
