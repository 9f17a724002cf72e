"""`salachat serve`: the model behind an OpenAI-compatible HTTP server (salachat/server/)."""

from typing import Annotated

import typer

from salachat.cli import options as opt

Host = Annotated[str, typer.Option("--host", help="Address to listen on; loopback unless you mean to share it.")]
Port = Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on (0: any free port).")]
ApiKey = Annotated[str | None, typer.Option(
    "--api-key", envvar="SALACHAT_API_KEY", show_default=False,
    help="Answer 401 to every request without 'Authorization: Bearer KEY'.")]
Queue = Annotated[int, typer.Option(
    "--queue", min=0, help="Requests that may wait for the model; past it the server answers 429.")]
KeepStates = Annotated[int, typer.Option(
    "--keep-states", min=0, help="Engine states kept for follow-ups (read documents, ends of answers).")]
StateGb = Annotated[float, typer.Option(
    "--state-gb", min=0.0, help="Memory those states may take, in GB (least recently used go first).")]
NoReuse = Annotated[bool, typer.Option(
    "--no-reuse", help="Read every request from its first token (to measure what state reuse saves).")]


def serve(
    model: opt.Model = None,
    device: opt.Device = None,
    quant: opt.Quant = None,
    dtype: opt.Dtype = None,
    host: Host = "127.0.0.1",
    port: Port = 8000,
    api_key: ApiKey = None,
    queue: Queue = 32,
    keep_states: KeepStates = 4,
    state_gb: StateGb = 8.0,
    no_reuse: NoReuse = False,
    max_tokens: opt.MaxTokens = None,
    temperature: opt.Temperature = None,
    top_p: opt.TopP = None,
    min_p: opt.MinP = None,
    repeat_penalty: opt.RepeatPenalty = None,
    seed: opt.Seed = None,
) -> None:
    """Serve the model over the OpenAI chat-completions protocol; documents read once are never read again.
    The sampling options are the defaults of requests that do not say."""
    from rich.text import Text

    import salachat.server.command as server
    from salachat.console import err

    chosen = opt.settings(model=model, device=device, quant=quant, dtype=dtype)
    sampling = opt.sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, seed=seed)
    listener = server.listen(host, port)  # a port in use is reported before the model loads
    if not server.is_loopback(host) and not api_key:
        err.print(Text(f"note: listening on {host} without --api-key: anyone who reaches this port can use the "
                       "model", style="yellow"))
    from salachat.chat import open_model

    with err.status(Text(f"loading {chosen['model'] or 'the default model'} …")):
        loaded = open_model(chosen["model"], device=chosen["device"], quant=chosen["quant"], dtype=chosen["dtype"])
    server.run(listener, loaded, api_key=api_key, max_waiting=queue, max_states=keep_states,
               max_bytes=int(state_gb * 2**30), reuse=not no_reuse, default_sampling=sampling,
               on_ready=lambda url: err.print(Text(f"serving {loaded.model_id} at {url} (Ctrl-C stops)")))


def register(app: typer.Typer) -> None:
    app.command()(opt.with_global_options(serve))
