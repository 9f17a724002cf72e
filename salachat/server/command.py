"""What the `serve` command (salachat/cli/serve.py, which parses the options) calls: the listening socket,
uvicorn, and a clean stop. The one module of the server that the command line imports."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

from salachat import errors


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or one clear line: a port in use is reported before the model loads."""
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(listener: socket.socket, loaded, *, api_key: str | None = None, max_waiting: int = 32,
        max_states: int = 4, max_bytes: int = 8 << 30, reuse: bool = True, default_sampling=None,
        on_ready: Callable[[str], None] | None = None) -> None:
    """Serve `loaded` (an engine.loader.LoadedModel) on `listener` until Ctrl-C or SIGTERM."""
    from salachat.server.app import create_app
    from salachat.server.runner import Runner
    from salachat.server.states import StateStore

    states = StateStore(loaded, max_states=max_states, max_bytes=max_bytes, reuse=reuse)
    runner = Runner(states, max_waiting=max_waiting)
    app = create_app(runner, loaded.model_id, api_key=api_key, default_sampling=default_sampling)
    host, port = listener.getsockname()[:2]
    if on_ready is not None:
        on_ready(f"http://{f'[{host}]' if ':' in host else host}:{port}/v1")
    try:
        _server(app, runner).run(sockets=[listener])
    finally:
        runner.close()
        runner.join(timeout=30)  # a model thread stopped mid-operation at exit would abort the process


def _server(app, runner):
    """uvicorn's server, where Ctrl-C (or SIGTERM) first stops the model between two tokens, so that the
    answers in flight end at once (a 503 error in their stream) and the graceful shutdown need not wait."""
    import uvicorn

    class StoppingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            runner.close()
            super().handle_exit(sig, frame)

    # the model stops at its next token or chunk boundary: one CPU chunk can take seconds
    return StoppingServer(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30, lifespan="on"))
