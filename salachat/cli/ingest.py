"""`salachat ingest PATH…`: what would be read (files, pages, tokens, what is skipped and why, memory, time)."""

import json

import typer
from rich.text import Text

from salachat.cli import options as opt


def ingest(
    paths: opt.Paths,
    model: opt.Model = None,
    password: opt.Password = None,
    as_json: opt.Json = False,
) -> None:
    """Show what would be read (files, pages, tokens, what is skipped and why, memory, time) without answering."""
    opt.check_paths([p for p in paths if str(p) != "-"])
    from salachat import config
    from salachat.chat import read_documents
    from salachat.console import err, out

    stdin = None
    if any(str(p) == "-" for p in paths):
        import sys

        stdin = sys.stdin.buffer.read()
        paths = [p for p in paths if str(p) != "-"]
    plan = None
    if paths:  # sizes and estimates first, from stat and small samples: a reading too large is refused here
        from salachat.documents import check_plan, plan_documents

        plan = plan_documents(paths, password=password)
        if not as_json:
            for line in plan.lines():
                err.print(Text(line, style="dim"))
        check_plan(plan)
    documents = read_documents(paths, password=password, text=stdin)
    import salachat.ingest as ingest_lib
    from salachat.engine.loader import ModelLoadError

    spec = model or config.current().model
    try:
        tokenizer, bytes_per_token = _tokenizer(spec)
        encode = tokenizer.encode
    except ModelLoadError as e:  # still useful without the model: estimate the tokens
        err.print(Text.assemble(("note: ", "yellow"), f"{e}; token counts are estimates"))
        encode, bytes_per_token = None, ingest_lib.summary.DEFAULT_BYTES_PER_TOKEN
    import torch

    # Reading speed measured by bench/ask_cpu.py (CPU, default model) and bench/e2e.py (GPU); a rough guide.
    speed = 2000.0 if torch.cuda.is_available() else 300.0
    summary = ingest_lib.summarize(documents.docs, encode, bytes_per_token=bytes_per_token, tokens_per_second=speed)
    if as_json:
        data = summary.to_dict()
        data["plan"] = plan.to_dict() if plan is not None else None
        print(json.dumps(data, ensure_ascii=False, indent=2))
        return
    for doc in summary.documents:
        parts = [f"{doc.pages} pages" if doc.pages is not None else None,
                 f"{doc.files} files" if doc.files is not None else None,
                 f"{doc.chapters} chapters" if doc.chapters is not None else None,
                 f"{doc.tokens:,} tokens"]
        out.print(Text.assemble((doc.source, "bold"), f" ({doc.kind}) {doc.title!r}: ",
                                ", ".join(p for p in parts if p)))
        for item in doc.skipped[:20]:
            out.print(Text(f"    skipped {item['path']}: {item['reason']}"))
        if len(doc.skipped) > 20:
            out.print(Text(f"    … and {len(doc.skipped) - 20} more skipped (see --json)"))
    for line in summary.notes:
        out.print(Text.assemble(("note: ", "yellow"), line))
    kind = "counted" if summary.tokens_exact else "estimated"
    out.print(Text(
        f"total {summary.tokens:,} tokens ({kind}); context memory ≈ {summary.estimated_memory_bytes / 2**20:,.0f} "
        f"MiB; reading ≈ {summary.estimated_seconds:,.0f} s at {summary.tokens_per_second:,.0f} tokens/s"))


def _tokenizer(spec):
    from salachat import models

    return models.open_tokenizer(spec)


def register(app: typer.Typer) -> None:
    app.command()(opt.with_global_options(ingest))
