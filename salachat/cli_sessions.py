"""`salachat sessions list|show|rm|export` and `salachat resume`, plus what `ask --session` calls.

Thin like cli.py: parse, call salachat.sessions, print (answers on stdout, the rest on stderr).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from salachat import errors
from salachat.console import err, out, reading_progress
from salachat.errors import UserError

sessions_app = typer.Typer(help="List, show, remove and export saved sessions.", invoke_without_command=True)
IdArg = Annotated[str, typer.Argument(metavar="ID", help="The session's name, as given to --session.")]


def _user_error(e) -> UserError:
    saving = type(e).__name__ == "SessionSaveError"  # by name: importing it would import torch
    return UserError(str(e), errors.FAILED if saving else errors.NO_SESSION)


def _folder(name: str) -> Path:
    from salachat.paths import sessions_dir
    from salachat.sessions import SessionError, session_folder

    try:
        return session_folder(sessions_dir(), name)
    except SessionError as e:
        raise _user_error(e) from None


def _manifest(name: str) -> dict:
    from salachat.sessions import SessionError, read_manifest

    try:
        return read_manifest(_folder(name))
    except SessionError as e:
        raise _user_error(e) from None


def read_with_checkpoints(conversation, writer, quiet: bool, progress=None, should_stop=None) -> None:
    """Read what is queued, checkpointing into `writer` (measured interval, < 5% of reading), then save.

    The chat window passes its own `progress` (it draws its own bar) and `should_stop`; a stop (engine's
    Cancelled, raised between chunks where the cache is consistent) saves what was read, then propagates.
    """
    from salachat.engine.generate import Cancelled
    from salachat.sessions import Checkpointer, SessionError

    checkpointer = Checkpointer(writer.save)
    try:
        if conversation.pending_ids and progress is None and not quiet:
            with reading_progress() as bar:
                task = bar.add_task("read", total=len(conversation.pending_ids), rate="")

                def show(done, total, elapsed):
                    bar.update(task, completed=done, total=total, rate=f"{done / max(elapsed, 1e-9):,.0f} tok/s")

                conversation.read(show, on_chunk=checkpointer)
        elif conversation.pending_ids:
            try:
                conversation.read(progress, should_stop=should_stop, on_chunk=checkpointer)
            except Cancelled:
                writer.save(conversation)
                raise
        writer.save(conversation)
    except SessionError as e:
        raise _user_error(e) from None
    except KeyboardInterrupt:
        # The cache may be mid-chunk: keep the last checkpoint rather than save it. (Raised as a UserError
        # because Typer turns a bare KeyboardInterrupt into a silent return in non-standalone mode.)
        kept = writer.manifest["tokens"] if writer.manifest else 0
        raise UserError(f"stopped; session {writer.folder.name!r} keeps {kept:,} tokens read: "
                        f"`salachat resume {writer.folder.name}` continues the reading", errors.INTERRUPTED) from None


def conversation_for_ask(name: str, documents, loaded):
    """`ask --session NAME`: continue NAME if it read these documents with this model, else start it."""
    from salachat.conversation import ContextTooLong, Conversation
    from salachat.sessions import SessionError, SessionWriter, abandoned_before_first_save, load_conversation

    folder = _folder(name)
    summary = documents.summary()
    try:
        if folder.exists() and not abandoned_before_first_save(folder):
            manifest = _manifest(name)
            if [d["content_hash"] for d in manifest["documents"]] != [d["content_hash"] for d in summary]:
                raise UserError(f"session {name!r} holds other documents: continue it with `salachat resume {name}`, "
                                f"or pick another name, or `salachat sessions rm {name}`", errors.NO_SESSION)
            conversation, _ = load_conversation(folder, loaded)
            return conversation, SessionWriter(folder)
        conversation = Conversation(loaded)
        try:
            conversation.set_documents(documents.prompt_text)
        except ContextTooLong as e:
            raise UserError(str(e), errors.BAD_INPUT) from None
        return conversation, SessionWriter(folder, documents=summary)
    except SessionError as e:
        raise _user_error(e) from None


def save(writer, conversation) -> None:
    from salachat.sessions import SessionError

    try:
        writer.save(conversation)
    except SessionError as e:
        raise _user_error(e) from None


def _load_for(manifest: dict, model: str | None, device: str, spinner: bool = True):
    """The model a session was read with (or --model), with its quantisation, sparsity and dtype."""
    import torch

    from salachat.engine.loader import ModelLoadError, load_model

    flags = manifest["model"]["fingerprint"].split("+")[1:]
    quant = next((f for f in flags if f in ("int8", "nf4")), None)
    spec = model or manifest["model"]["id"]
    import contextlib

    with err.status(f"loading {spec} …") if spinner else contextlib.nullcontext():
        try:
            return load_model(spec, device=device, dtype=getattr(torch, manifest["model"]["dtype"]), quant=quant,
                              sparse="sparse" in flags)
        except ModelLoadError as e:
            raise UserError(f"{e} (session needs the model it was read with)", errors.NO_MODEL) from None


def resume(
    session_id: IdArg,
    question: Annotated[
        str | None, typer.Argument(metavar="QUESTION", help="Ask this; without it, open the chat window.")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="The model, if it moved since.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")] = "auto",
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Longest answer, in tokens.")] = 512,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 0.95,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
) -> None:
    """Continue a saved session: finish an interrupted reading, then answer QUESTION (or open the chat)."""
    from salachat.engine.generate import Sampling, Stats
    from salachat.conversation import ContextTooLong
    from salachat.sessions import SessionError, SessionWriter, load_conversation

    folder = _folder(session_id)
    manifest = _manifest(session_id)
    if question is None:  # the window loads the model and finishes any interrupted reading, with progress
        from salachat import tui

        raise typer.Exit(tui.run(session_id=session_id, model=model, device=device, max_tokens=max_tokens,
                                 temperature=temperature))
    loaded = _load_for(manifest, model, device)
    t0 = time.perf_counter()
    try:
        conversation, manifest = load_conversation(folder, loaded)
        writer = SessionWriter(folder)
    except SessionError as e:
        raise _user_error(e) from None
    load_seconds = time.perf_counter() - t0
    if conversation.pending_ids:
        err.print(f"continuing the reading of session {session_id!r}: {len(conversation.pending_ids):,} tokens left")
        read_with_checkpoints(conversation, writer, quiet=as_json)
    stats, pieces = Stats(), []
    sampling = Sampling(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    try:
        for piece in conversation.ask(question, sampling, stats=stats):
            pieces.append(piece)
            if not as_json:
                out.print(piece, end="")
    except ContextTooLong as e:
        raise UserError(str(e), errors.BAD_INPUT) from None
    save(writer, conversation)
    if as_json:
        print(json.dumps({"answer": "".join(pieces), "session": session_id, "model": loaded.model_id,
                          "documents": manifest["documents"], "context_tokens": conversation.tokens_in_context,
                          "session_load_seconds": round(load_seconds, 4), **stats.to_dict()}, ensure_ascii=False))
    else:
        out.print()


@sessions_app.callback()
def sessions_default(ctx: typer.Context) -> None:
    """Bare `salachat sessions` lists them."""
    if ctx.invoked_subcommand is None:
        sessions_list()


@sessions_app.command("list")
def sessions_list() -> None:
    """Saved sessions, newest first: documents, model, context size, state."""
    from salachat.paths import sessions_dir
    from salachat.sessions import list_sessions

    found = list_sessions(sessions_dir())
    if not found:
        err.print("no sessions yet: `salachat ask FILE \"question\" --session NAME` saves one")
    for name, manifest, problem in found:
        if manifest is None:
            out.print(f"[bold]{name}[/]  [red]unusable:[/] {problem}")
            continue
        titles = ", ".join(d.get("title") or d.get("source") or "?" for d in manifest["documents"]) or "no documents"
        state = "reading interrupted" if manifest["conversation"]["pending_tokens"] else \
            f"{len(manifest['conversation']['turns'])} questions"
        out.print(f"[bold]{name}[/]  {titles}  {manifest['tokens']:,} tokens, {state}, "
                  f"{manifest['model']['id']}, {manifest['updated']}")


@sessions_app.command("show")
def sessions_show(session_id: IdArg) -> None:
    """A session's documents, model, size on disk and questions."""
    manifest = _manifest(session_id)
    disk = sum(f["bytes"] for f in manifest["files"].values())
    saved = manifest["conversation"]
    out.print(f"[bold]{session_id}[/]  created {manifest['created']}, updated {manifest['updated']}")
    out.print(f"model: {manifest['model']['id']} (fingerprint {manifest['model']['fingerprint']}, "
              f"{manifest['model']['dtype']})")
    for d in manifest["documents"]:
        out.print(f"document: {d.get('source')} ({d.get('kind')}) {d.get('title')!r}")
    reading = f", {saved['pending_tokens']:,} left to read" if saved["pending_tokens"] else ""
    out.print(f"context: {manifest['tokens']:,} tokens ({manifest['document_tokens']:,} of documents{reading}); "
              f"on disk {disk / 2**20:,.1f} MiB in {len(manifest['files'])} files")
    for i, turn in enumerate(saved["turns"], 1):
        out.print(f"{i}. {turn['question']}")


@sessions_app.command("rm")
def sessions_rm(session_id: IdArg) -> None:
    """Delete a session (its folder under the data folder)."""
    from salachat.sessions import SessionError, remove_session

    try:
        remove_session(_folder(session_id))
    except SessionError as e:
        raise _user_error(e) from None
    err.print(f"removed session {session_id!r}")


@sessions_app.command("export")
def sessions_export(
    session_id: IdArg,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of Markdown.")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file, not stdout.")] = None,
) -> None:
    """The transcript: Markdown (default) or JSON."""
    from salachat.sessions.transcript import transcript_json, transcript_markdown

    manifest = _manifest(session_id)
    text = transcript_json(session_id, manifest) if as_json else transcript_markdown(session_id, manifest)
    if output is None:
        print(text, end="" if text.endswith("\n") else "\n")
    else:
        output.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
        err.print(f"wrote {output}")


def register(app: typer.Typer) -> None:
    app.add_typer(sessions_app, name="sessions")
    app.command("resume")(resume)
