"""The `salachat` command line. Thin: parse, call the library, print (answers on stdout, the rest on stderr)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from salachat import errors
from salachat.console import err, out, reading_progress
from salachat.errors import UserError

app = typer.Typer(
    name="salachat",
    help="Ask questions about very long documents (books, PDFs, code repositories), locally.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="List the known models and install them.", invoke_without_command=True)
app.add_typer(models_app, name="models")

ModelOpt = Annotated[
    Optional[str], typer.Option("--model", "-m", help="A known model name, a GGUF file or a Hugging Face folder.")
]
QuantOpt = Annotated[Optional[str], typer.Option("--quant", help="Quantise weights on load: int8 or nf4.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")]
SparseOpt = Annotated[
    bool, typer.Option("--sparse", help="Llama models: read past the trained length with sparse block attention.")
]


@app.callback()
def main_options(
    data_dir: Annotated[
        Optional[Path], typer.Option("--data-dir", help="Where salachat keeps models, sessions and caches.")
    ] = None,
    kv_gpu_gb: Annotated[
        Optional[float], typer.Option(
            "--kv-gpu-gb", min=0.0, envvar="SALACHAT_KV_GPU_GB",
            help="GPU memory for the sparse layers' KV cache; older blocks wait in host memory and are fetched "
                 "when selected (for contexts larger than the GPU).")
    ] = None,
) -> None:
    import os

    from salachat.paths import set_data_dir

    set_data_dir(data_dir)
    if kv_gpu_gb is not None:  # read by engine.loader.load_model, whichever command loads the model
        os.environ["SALACHAT_KV_GPU_GB"] = str(kv_gpu_gb)


def check_quant(quant: str | None) -> None:
    if quant not in (None, "int8", "nf4"):
        raise UserError(f"--quant {quant}: choose int8 or nf4", errors.USAGE)


def _load(model: str | None, device: str, quant: str | None, sparse: bool, spinner: bool = True):
    """spinner=False inside the chat window, which owns the terminal."""
    import contextlib

    from salachat.engine.loader import ModelLoadError, load_model

    check_quant(quant)
    with err.status(f"loading {model or 'the default model'} …") if spinner else contextlib.nullcontext():
        try:
            return load_model(model, device=device, quant=quant, sparse=sparse)
        except ModelLoadError as e:
            raise UserError(str(e), errors.NO_MODEL) from None


def _read_with_progress(conversation, quiet: bool) -> None:
    total = len(conversation.pending_ids)
    if not total:
        return
    if quiet:
        conversation.read()
        return
    with reading_progress() as bar:
        task = bar.add_task("read", total=total, rate="")

        def progress(done, all_tokens, elapsed):
            rate = f"{done / elapsed:,.0f} tok/s" if elapsed > 0 else ""
            bar.update(task, completed=done, total=all_tokens, rate=rate)

        conversation.read(progress)


@app.command()
def ask(
    paths: Annotated[list[Path], typer.Argument(help="Documents: PDF, EPUB, text, HTML, Markdown or a folder.")],
    question: Annotated[str, typer.Argument(help="The question to ask about them.")],
    model: ModelOpt = None,
    quant: QuantOpt = None,
    device: DeviceOpt = "auto",
    sparse: SparseOpt = False,
    session: Annotated[Optional[str], typer.Option("--session", "-s", help="Save as (or continue) this session.")] = None,
    password: Annotated[Optional[str], typer.Option("--password", help="Password of an encrypted PDF.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Longest answer, in tokens.")] = 512,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 0.95,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
) -> None:
    """Read the documents, then stream the answer to QUESTION."""
    from salachat.engine.generate import Sampling, Stats
    from salachat.conversation import Conversation, ContextTooLong
    from salachat.documents import load_documents

    documents = load_documents(paths, password=password)
    loaded = _load(model, device, quant, sparse)
    writer = None
    if session:  # saved as it reads (checkpoints), and after the answer; an existing session continues
        conversation, writer = cli_sessions.conversation_for_ask(session, documents, loaded)
    else:
        conversation = Conversation(loaded)
        try:
            conversation.set_documents(documents.prompt_text)
        except ContextTooLong as e:
            raise UserError(str(e), errors.BAD_INPUT) from None
    t0 = time.perf_counter()
    if writer is not None:
        cli_sessions.read_with_checkpoints(conversation, writer, quiet=as_json)
    else:
        _read_with_progress(conversation, quiet=as_json)
    read_seconds = time.perf_counter() - t0
    stats = Stats()
    sampling = Sampling(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    pieces = []
    try:
        for piece in conversation.ask(question, sampling, stats=stats):
            pieces.append(piece)
            if not as_json:
                out.print(piece, end="")
    except ContextTooLong as e:
        raise UserError(str(e), errors.BAD_INPUT) from None
    answer = "".join(pieces)
    if writer is not None:
        cli_sessions.save(writer, conversation)
    if as_json:
        print(json.dumps({
            "answer": answer,
            "session": session,
            "model": loaded.model_id,
            "documents": documents.summary(),
            "document_tokens": conversation.document_tokens,
            "read_seconds": round(read_seconds, 4),
            **stats.to_dict(),
        }, ensure_ascii=False))
    else:
        out.print()
        from salachat.documents import cited_passages

        for passage in cited_passages(documents, answer):
            excerpt = " ".join(passage.text.split())
            excerpt = excerpt[:240] + ("…" if len(excerpt) > 240 else "")
            err.print(f"[dim]── {passage.source}[/]\n[dim]{excerpt}[/]", markup=True)


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Documents or folders to read.")],
    model: ModelOpt = None,
    password: Annotated[Optional[str], typer.Option("--password", help="Password of an encrypted PDF.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Show what would be read (files, pages, tokens, what is skipped and why, memory, time) without answering."""
    import salachat.ingest as ingest_lib

    from salachat.engine.loader import ModelLoadError, load_tokenizer
    from salachat.documents import load_documents

    documents = load_documents(paths, password=password)
    try:
        tokenizer, bytes_per_token = load_tokenizer(model)
        encode = tokenizer.encode
    except ModelLoadError as e:  # still useful without the model: estimate the tokens
        err.print(f"[yellow]note:[/] {e}; token counts are estimates")
        encode, bytes_per_token = None, ingest_lib.summary.DEFAULT_BYTES_PER_TOKEN
    import torch

    # Reading speed measured by bench/ask_cpu.py (CPU, default model) and bench/e2e.py (GPU); a rough guide.
    speed = 2000.0 if torch.cuda.is_available() else 300.0
    summary = ingest_lib.summarize(documents.docs, encode, bytes_per_token=bytes_per_token, tokens_per_second=speed)
    if as_json:
        print(json.dumps(summary.to_dict(), ensure_ascii=False, indent=2))
        return
    for doc in summary.documents:
        parts = [f"{doc.pages} pages" if doc.pages is not None else None,
                 f"{doc.files} files" if doc.files is not None else None,
                 f"{doc.chapters} chapters" if doc.chapters is not None else None,
                 f"{doc.tokens:,} tokens"]
        out.print(f"[bold]{doc.source}[/] ({doc.kind}) {doc.title!r}: " + ", ".join(p for p in parts if p))
        for item in doc.skipped[:20]:
            out.print(f"    skipped {item['path']}: {item['reason']}")
        if len(doc.skipped) > 20:
            out.print(f"    … and {len(doc.skipped) - 20} more skipped (see --json)")
    for note in summary.notes:
        out.print(f"[yellow]note:[/] {note}")
    kind = "counted" if summary.tokens_exact else "estimated"
    out.print(
        f"total {summary.tokens:,} tokens ({kind}); context memory ≈ {summary.estimated_memory_bytes / 2**20:,.0f} MiB; "
        f"reading ≈ {summary.estimated_seconds:,.0f} s at {summary.tokens_per_second:,.0f} tokens/s"
    )


@models_app.callback()
def models_default(ctx: typer.Context) -> None:
    """Bare `salachat models` lists them."""
    if ctx.invoked_subcommand is None:
        models_list()


@models_app.command("list")
def models_list() -> None:
    """Known models, where each is on disk, and how to get it."""
    from salachat.engine import registry

    for name, known in registry.KNOWN_MODELS.items():
        path = registry.locate(name)
        default = " (default)" if name == registry.DEFAULT_MODEL else ""
        where = f"installed: {path}" if path else f"not installed: {known.how_to_get}"
        out.print(f"[bold]{name}[/]{default}  {known.description}\n    {where}")


@models_app.command("pull")
def models_pull(name: Annotated[str, typer.Argument(help="Model name, e.g. smollm2.")] = "smollm2") -> None:
    """Download a known model's weights into the models folder."""
    from salachat.engine import registry

    try:
        registry.pull(name, log=lambda message: err.print(message))
    except registry.ModelNotInstalled as e:
        raise UserError(str(e), errors.NO_MODEL) from None


from salachat import cli_chat, cli_sessions  # register `chat`, `sessions` and `resume` on the app above

cli_sessions.register(app)
cli_chat.register(app)


def main() -> None:
    try:
        code = app(standalone_mode=False)
        # Typer turns Ctrl-C into a bare return of 130 when not in standalone mode
        if isinstance(code, int) and code != 0:
            if code == errors.INTERRUPTED:
                err.print("stopped.")
            sys.exit(code)
    except UserError as e:
        err.print(f"[red]error:[/] {e}", highlight=False, markup=True)
        sys.exit(e.code)
    except KeyboardInterrupt:
        err.print("stopped.")
        sys.exit(errors.INTERRUPTED)
    except SystemExit:
        raise
    except Exception as e:  # click's usage errors and aborts
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            err.print("stopped.")
            sys.exit(errors.INTERRUPTED)
        raise
