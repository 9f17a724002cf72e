"""`salachat ask PATH… QUESTION`: read the documents, stream the answer."""

import sys
import time
from typing import Annotated

import typer
from rich.text import Text

from salachat.cli import options as opt
from salachat.cli import output


def ask(
    paths: opt.Paths,
    question: Annotated[str, typer.Argument(help="The question to ask about them.", show_default=False)],
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
    as_json: opt.Json = False,
) -> None:
    """Read the documents, then stream the answer to QUESTION (`-` reads a document from standard input)."""
    opt.check_paths(paths)
    if not question.strip():
        from salachat.errors import UsageError

        raise UsageError("the question is empty")
    if session is not None:
        from salachat.sessions import check_name

        check_name(session)  # before anything is read
    chosen = opt.settings(model=model, device=device, quant=quant, dtype=dtype, long_context=long_context,
                          sparse=sparse, system=system)
    sampling = opt.sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, seed=seed)
    stdin = None
    if any(str(p) == "-" for p in paths):
        if sys.stdin.isatty():
            from salachat.errors import UsageError

            raise UsageError("- reads a document from standard input, which is a terminal here: pipe one in "
                             "(cat notes.md | salachat ask - \"question\")")
        stdin = sys.stdin.buffer.read()
        paths = [p for p in paths if str(p) != "-"]
    from salachat.chat import ChatSession
    from salachat.console import err

    documents = _documents(paths, password, stdin)
    if engine is not None:  # the server runs the model; the documents were read here
        from salachat.remote import RemoteSession

        chat = RemoteSession.open(engine, documents=documents, model=model, system_prompt=chosen["system_prompt"])
        answer_with(chat, question, sampling, as_json)
        return
    with err.status(Text(f"loading {chosen['model'] or 'the default model'} …")):
        chat = ChatSession.open(documents=documents, session=session, password=password,
                                on_note=None if as_json else output.note, **chosen)
    answer_with(chat, question, sampling, as_json)


def _documents(paths, password, stdin):
    from salachat.chat import read_documents

    return read_documents(paths, password=password, text=stdin)


def answer_with(chat, question: str, sampling, as_json: bool, load_seconds: float | None = None) -> None:
    """Read what is queued (with a progress bar), stream the answer, show the passages it cites."""
    from salachat.engine.generate import Stats

    t0 = time.perf_counter()
    with output.progress_bar(enabled=not as_json and chat.pending_tokens > 0) as progress:
        chat.read(progress)
    read_seconds = time.perf_counter() - t0
    stats = Stats()
    answer = output.stream(chat.ask(question, sampling, stats=stats), as_json)
    if as_json:
        output.answer_json(chat, answer, stats, read_seconds=read_seconds, load_seconds=load_seconds)
    else:
        output.cited(chat.cited_passages(answer))


def register(app: typer.Typer) -> None:
    app.command()(opt.with_global_options(ask))
