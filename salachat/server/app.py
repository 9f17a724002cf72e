"""The HTTP face: Starlette routes over the Runner. No model logic here.

Routes: POST /v1/chat/completions (streamed as server-sent events with "stream": true), GET /v1/models,
GET /health. With an API key, every route answers 401 to a request without `Authorization: Bearer KEY`.
Every error is OpenAI's shape, {"error": {"message", "type", "param", "code"}}, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from salachat.engine.generate import Sampling
from salachat.server.protocol import (
    SESSION_PREFIX,
    ApiError,
    chunk,
    completion,
    completion_id,
    parse_request,
)
from salachat.server.runner import Event, Job, QueueFull, Runner, api_error

MAX_BODY_BYTES = 256 << 20  # a 1M-token document is about 4 MB of text; this leaves room for many


def error_response(error: ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status, headers=headers)


def create_app(runner: Runner, model_id: str, *, api_key: str | None = None,
               default_sampling: Sampling | None = None) -> Starlette:
    default_sampling = default_sampling or Sampling()
    created = int(time.time())

    def served_names() -> set[str]:
        from pathlib import Path

        return {model_id, Path(model_id).name}

    async def chat_completions(request: Request) -> Response:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request is {len(raw) >> 20} MiB, more than {MAX_BODY_BYTES >> 20} MiB")
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"the request body is not JSON: {e}") from None
        chat = parse_request(body, default_sampling)
        if chat.session is None and chat.model not in served_names():
            raise ApiError(404, f"model {chat.model!r} is not served here: use {model_id!r}, or "
                           f"'{SESSION_PREFIX}NAME' for a saved session (GET /v1/models lists them)",
                           code="model_not_found", param="model")
        if chat.session is not None:
            from salachat.sessions import SessionError, check_name

            try:
                check_name(chat.session)
            except SessionError as e:
                raise ApiError(404, str(e), code="model_not_found", param="model") from None
        job = Job(chat, asyncio.get_running_loop())
        try:
            runner.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e.args[0]} requests are waiting for the model, the most it "
                           "queues (salachat serve --queue); try again shortly",
                           type="rate_limit_error", code="queue_full") from None
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        name = chat.model
        if not chat.stream:
            try:
                return await _whole_answer(job, name)
            finally:
                watcher.cancel()
        # the status line waits for the model thread to accept the request (a missing session is a 404, not
        # an error inside a 200 stream); a request waiting in the queue waits here
        try:
            first: Event = await job.events.get()
        except BaseException:
            watcher.cancel()
            job.cancel()
            raise
        if first.kind != "started":
            watcher.cancel()
            if first.kind == "error":
                return error_response(first.error)
            return Response(status_code=499)
        return StreamingResponse(_stream(job, name, chat.include_usage, watcher), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def models(request: Request) -> Response:
        data = [{"id": model_id, "object": "model", "created": created, "owned_by": "salachat"}]
        data += [{"id": f"{SESSION_PREFIX}{name}", "object": "model", "created": created, "owned_by": "salachat"}
                 for name in _saved_sessions(runner)]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> Response:
        return JSONResponse({
            "status": "ok", "model": model_id, "busy": runner.current is not None,
            "waiting": len(runner.waiting), "served": runner.served, "cancelled": runner.cancelled,
            "states": len(runner.states), "state_bytes": runner.states.nbytes,
        })

    async def on_api_error(request: Request, error: ApiError) -> Response:
        return error_response(error, {"Retry-After": "1"} if error.status == 429 else None)

    async def on_http_error(request: Request, error: HTTPException) -> Response:
        messages = {404: f"no route {request.url.path}: the server serves /v1/chat/completions, /v1/models and "
                         "/health", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(ApiError(error.status_code, messages.get(error.status_code, str(error.detail)),
                                       code="not_found" if error.status_code == 404 else None))

    async def on_any_error(request: Request, error: Exception) -> Response:
        return error_response(api_error(error))

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, Exception: on_any_error},
        lifespan=_closing(runner),
    )
    if api_key:
        return _RequireKey(app, api_key)
    return app


class _RequireKey:
    """ASGI middleware: 401 in OpenAI's shape unless the request carries `Authorization: Bearer KEY`."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with "
                                 "the key the server was started with", code="invalid_api_key")
                await error_response(error, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """A client that goes away, waiting or mid-answer, frees the model (checked between tokens)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


async def _whole_answer(job: Job, model: str) -> Response:
    pieces = []
    while True:
        event: Event = await job.events.get()
        if event.kind == "piece":
            pieces.append(event.text)
        elif event.kind in ("started", "progress"):
            continue
        elif event.kind == "error":
            return error_response(event.error)
        elif event.kind == "cancelled":
            return Response(status_code=499)  # nginx's "client closed request": nobody is there to read it
        elif event.kind == "done":
            return JSONResponse(completion(completion_id(), model, "".join(pieces), event.finish_reason, event.usage))


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(job: Job, model: str, include_usage: bool, watcher: asyncio.Task):
    cid = completion_id()
    try:
        yield _sse(chunk(cid, model, {"role": "assistant", "content": ""}))
        while True:
            event: Event = await job.events.get()
            if event.kind == "progress":
                # an SSE comment: clients ignore it, and it keeps proxies and timeouts from closing a long reading
                yield f": reading {event.done}/{event.total}\n\n"
            elif event.kind == "piece":
                yield _sse(chunk(cid, model, {"content": event.text}))
            elif event.kind == "error":
                yield _sse(event.error.to_dict())
                break
            elif event.kind == "cancelled":
                return
            elif event.kind == "done":
                yield _sse(chunk(cid, model, {}, event.finish_reason))
                if include_usage:
                    yield _sse(chunk(cid, model, {}, usage=event.usage))
                break
        yield _sse("[DONE]")
    finally:
        job.cancel()  # a no-op once the job is done; frees the model when the client left mid-answer
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def _closing(runner: Runner):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        runner.close()  # a stopped server stops the model between tokens, not after the answer

    return lifespan


def _saved_sessions(runner: Runner) -> list[str]:
    """Saved sessions this server's model can continue (same weights), for GET /v1/models."""
    from salachat.paths import sessions_dir
    from salachat.sessions import list_sessions

    fingerprint = runner.states.loaded.fingerprint.split("+")[0]
    return [name for name, manifest, _error in list_sessions(sessions_dir())
            if manifest and str(manifest.get("model", {}).get("fingerprint", "")).split("+")[0] == fingerprint]
