"""`salachat serve`: the model behind an OpenAI-compatible HTTP server (salachat/server/)."""

import ipaddress
import socket
import sys
from typing import Annotated

import typer

from salachat import errors

Host = Annotated[str, typer.Option("--host", help="Address to listen on; loopback unless you mean to share it.")]
Port = Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on (0: any free port).")]
ApiKey = Annotated[str | None, typer.Option(
    "--api-key", envvar="SALACHAT_API_KEY", show_default=False,
    help="Answer 401 to every request without 'Authorization: Bearer KEY'. [env: SALACHAT_API_KEY]")]
Queue = Annotated[int, typer.Option(
    "--queue", min=0, help="Requests that may wait for the model; past it the server answers 429.")]
KeepStates = Annotated[int, typer.Option(
    "--keep-states", min=0, help="Engine states kept for follow-ups (read documents, ends of answers).")]
StateGb = Annotated[float, typer.Option(
    "--state-gb", min=0.0, help="Memory those states may take, in GB (least recently used go first).")]
NoReuse = Annotated[bool, typer.Option(
    "--no-reuse", help="Read every request from its first token (to measure what state reuse saves).")]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", show_default=False, help="A known model name, a GGUF file or a Hugging Face folder.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")]
QuantOpt = Annotated[str | None, typer.Option("--quant", help="Quantise weights on load: int8 or nf4.")]
MaxTokensOpt = Annotated[int, typer.Option(
    "--max-tokens", min=1, help="Longest answer when a request gives no max_tokens.")]
TemperatureOpt = Annotated[float, typer.Option(
    "--temperature", min=0.0, max=2.0, help="Temperature when a request gives none (0 = greedy).")]


def serve(
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    quant: QuantOpt = None,
    host: Host = "127.0.0.1",
    port: Port = 8000,
    api_key: ApiKey = None,
    queue: Queue = 32,
    keep_states: KeepStates = 4,
    state_gb: StateGb = 8.0,
    max_tokens: MaxTokensOpt = 512,
    temperature: TemperatureOpt = 0.0,
    no_reuse: NoReuse = False,
) -> None:
    """Serve the model over the OpenAI chat-completions protocol; documents read once are never read again."""
    from salachat.console import err

    listener = _listen(host, port)  # a port in use is reported before the model loads
    bound_host, bound_port = listener.getsockname()[:2]
    if not _is_loopback(host) and not api_key:
        err.print(f"[yellow]note:[/] listening on {host} without --api-key: anyone who reaches this port can use "
                  "the model", highlight=False)
    from salachat.chat import open_model
    from salachat.engine.generate import Sampling
    from salachat.engine.loader import ModelLoadError

    with err.status(f"loading {model or 'the default model'} …"):
        try:
            loaded = open_model(model, device=device, quant=quant)
        except ModelLoadError as e:
            raise errors.UserError(str(e), errors.NO_MODEL) from None
    import uvicorn

    from salachat.server.app import create_app
    from salachat.server.runner import Runner
    from salachat.server.states import StateStore

    states = StateStore(loaded, max_states=keep_states, max_bytes=int(state_gb * 2**30), reuse=not no_reuse)
    runner = Runner(states, max_waiting=queue)
    app = create_app(runner, loaded.model_id, api_key=api_key,
                     default_sampling=Sampling(temperature=temperature, max_tokens=max_tokens))
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    err.print(f"serving {loaded.model_id} at http://{shown}:{bound_port}/v1 (Ctrl-C stops)", highlight=False)
    sys.stderr.flush()
    # the model stops at its next token or chunk boundary once Ctrl-C is pressed: one CPU chunk can take seconds
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30, lifespan="on")
    try:
        _server(config, runner).run(sockets=[listener])
    finally:
        runner.close()
        runner.join(timeout=30)  # a model thread stopped mid-operation at exit would abort the process


def _server(config, runner):
    """uvicorn's server, where Ctrl-C (or SIGTERM) first stops the model between two tokens, so that the
    answers in flight end at once (a 503 error in their stream) and the graceful shutdown need not wait."""
    import uvicorn

    class StoppingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            runner.close()
            super().handle_exit(sig, frame)

    return StoppingServer(config)


def _listen(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise errors.UsageError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError as e:
        listener.close()
        raise errors.UserError(f"cannot listen on {host}:{port}: {e.strerror} (another server there? pick "
                               "another --port)", errors.FAILED) from None
    listener.listen(128)
    return listener


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def register(app: typer.Typer) -> None:
    app.command()(serve)
