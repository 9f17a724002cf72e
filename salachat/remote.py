"""A conversation held by an OpenAI-compatible server (`--engine URL`): another `salachat serve`, SGLang,
vLLM, llama-server, Ollama … The documents are read here and sent as text; the model runs there.

RemoteSession has the part of ChatSession's interface that the CLI and the chat window use:

    session = RemoteSession.open("http://gpu-box:8000", paths=["book.pdf"])   # or .resume(URL, "tolstoy")
    session.read(progress)                     # nothing to read here: the server reads with the first question
    stats = Stats()
    for piece in session.ask("Who kept the light?", Sampling(max_tokens=200), stats=stats):
        print(piece, end="")
    session.context()                          # tokens the server reported, as a chat.Context

- The documents open the first user message as `<documents>\n…\n</documents>\n\nquestion`, exactly as a
  local conversation writes them: a `salachat serve` recognises the block, reads it once and branches every
  later question from that reading (usage.prompt_tokens_details.cached_tokens says how much it reused).
  Any other server just sees a long user message. The whole history goes with every question (the protocol
  is stateless); keeping state between requests is the server's business.
- `resume(URL, NAME)` continues the saved session NAME that the server holds (model "session:NAME", what
  `salachat serve` offers in GET /v1/models).
- The URL may end in /v1 or not. The API key comes from `api_key=`, else $SALACHAT_API_KEY, else
  $OPENAI_API_KEY.
- Stats: prompt and completion tokens come from the server's usage; times are measured here
  (first_token_seconds from the request to the first piece); `extra["cached_tokens"]` is what the server
  reused. `should_stop()` is checked between pieces and closes the stream, which frees a salachat server's
  model at once.
- Failures raise RemoteError, a salachat.errors.UserError whose code the CLI exits with: 1 (cannot reach
  the server, or it failed), 2 (rejected key or request), 4 (the server does not serve that model),
  5 (the named saved session is missing there).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from salachat import errors

DEFAULT_TIMEOUT = 600.0  # seconds without a byte from the server (a long document's reading sends comments)


class RemoteError(errors.UserError):
    """The server could not be reached, or answered with an error; the message is one line."""


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise errors.UsageError(f"--engine {url}: give the server's address, e.g. http://127.0.0.1:8000")
    return url if url.endswith("/v1") else url + "/v1"


def _documents_block(documents_text: str) -> str:
    from salachat.server.protocol import DOCUMENTS_CLOSE, DOCUMENTS_OPEN

    return f"{DOCUMENTS_OPEN}{documents_text}{DOCUMENTS_CLOSE}"


class RemoteSession:
    """One conversation with a model behind an OpenAI-compatible server. See the module's docstring."""

    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None,
                 system_prompt: str | None = None, documents=None, documents_text: str = "",
                 session: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        import httpx

        self.url = _base_url(url)
        self.api_key = api_key or os.environ.get("SALACHAT_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.requested_model = f"session:{session}" if session else model
        self.remote_session = session
        self.system_prompt = system_prompt
        self.documents = documents  # salachat.documents.Documents read here (None for a remote session)
        self.documents_text = documents.prompt_text if documents is not None else documents_text
        self.turns: list = []  # conversation.Turn(question, answer, stats)
        self.notes: list[str] = []
        self.document_lines: list = []
        self._usage: dict = {}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))
        self._model_id: str | None = None

    # opening

    @classmethod
    def open(cls, url: str, *, paths: list[Path | str] | None = None, documents=None, text: str | None = None,
             model: str | None = None, system_prompt: str | None = None, password: str | None = None,
             api_key: str | None = None, session: str | None = None, **_ignored) -> RemoteSession:
        """Documents (paths / documents / text, read here) for the server's model (`model`, else the first
        it lists). `session=NAME` with no documents continues the server's saved session NAME. ChatSession's
        options that only concern a local engine (device, quant, long_context …) are ignored."""
        has_documents = bool(paths) or documents is not None or text is not None
        if session is not None and not has_documents:
            return cls.resume(url, session, api_key=api_key)
        if has_documents and documents is None:
            from salachat.chat import read_documents

            documents = read_documents(paths or [], password=password, text=text)
        remote = cls(url, model=model, api_key=api_key, system_prompt=system_prompt, documents=documents)
        if documents is not None:
            from salachat.chat import DocumentLine

            remote.document_lines = [DocumentLine(d.source, d.kind, len(d.segments), None) for d in documents.docs]
        return remote

    @classmethod
    def resume(cls, url: str, name: str, *, api_key: str | None = None, **_ignored) -> RemoteSession:
        """The saved session NAME that the server holds (GET /v1/models lists them as session:NAME)."""
        return cls(url, api_key=api_key, session=name)

    def close(self) -> None:
        self._client.close()

    # what it holds

    @property
    def model_id(self) -> str:
        return self._model_id or self.requested_model or "?"

    @property
    def session_name(self) -> str | None:
        return self.remote_session

    @property
    def pending_tokens(self) -> int:
        return 0

    @property
    def saved_tokens(self) -> int | None:
        return None

    @property
    def manifest_documents(self) -> list[dict]:
        return self.documents.summary() if self.documents is not None else []

    def context(self):
        """A chat.Context of what the server last reported (the fields a local engine alone knows are None)."""
        import dataclasses

        from salachat.chat import Context

        prompt = int(self._usage.get("prompt_tokens") or 0)
        completion = int(self._usage.get("completion_tokens") or 0)
        known = {"tokens": prompt + completion, "pending_tokens": 0, "document_tokens": 0,
                 "long_context": "remote", "state_bytes": 0, "device": "REMOTE"}
        return Context(**{f.name: known.get(f.name) for f in dataclasses.fields(Context)})

    def cited_passages(self, answer: str) -> list:
        if self.documents is None:
            return []
        from salachat.documents import cited_passages

        return cited_passages(self.documents, answer)

    def messages(self, question: str) -> list[dict]:
        """The chat-completions messages for the conversation so far and `question`."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for i, turn in enumerate(self.turns):
            messages += [{"role": "user", "content": self._question(i, turn.question)},
                         {"role": "assistant", "content": turn.answer}]
        messages.append({"role": "user", "content": self._question(len(self.turns), question)})
        return messages

    def _question(self, index: int, question: str) -> str:
        if index == 0 and self.documents_text:
            return _documents_block(self.documents_text) + question
        return question

    # reading and asking

    def read(self, progress: Callable | None = None, should_stop: Callable[[], bool] | None = None) -> None:
        """Nothing is read here: the server reads the documents with the first question."""

    def save(self) -> None:
        """A remote conversation is not saved here (a salachat server keeps its state in memory)."""

    def models(self) -> list[str]:
        """The model ids the server lists (GET /v1/models)."""
        body = self._call("GET", "/models")
        return [m.get("id") for m in body.get("data", []) if isinstance(m, dict)]

    def ask(self, question: str, sampling=None, *, progress: Callable | None = None,
            should_stop: Callable[[], bool] | None = None, stats=None) -> Iterator[str]:
        """Stream the answer's text pieces; the exchange joins the conversation however the stream ends."""
        from salachat.conversation import Turn
        from salachat.engine.generate import Sampling, Stats

        sampling = sampling if sampling is not None else Sampling()
        stats = stats if stats is not None else Stats()
        if self.requested_model is None:
            listed = self.models()
            if not listed:
                raise RemoteError(f"{self.url}/models lists no model: pass --model NAME", errors.NO_MODEL)
            self.requested_model = listed[0]
        body = {"model": self.requested_model, "messages": self.messages(question), "stream": True,
                "stream_options": {"include_usage": True}, "max_tokens": sampling.max_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p}
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        # not OpenAI's, but what salachat, vLLM, SGLang and llama.cpp's server take: sent only when asked for
        if getattr(sampling, "min_p", 0.0):
            body["min_p"] = sampling.min_p
        if getattr(sampling, "repeat_penalty", 1.0) != 1.0:
            body["repetition_penalty"] = sampling.repeat_penalty
        turn = Turn(question, "")
        pieces: list[str] = []
        started = time.perf_counter()
        first_piece_at = None
        stats.stopped_by = "cancelled"
        try:
            with self._stream(body) as response:
                for event in _events(response):
                    if "error" in event:
                        raise _error_from(event, 500)
                    self._model_id = event.get("model") or self._model_id
                    if event.get("usage"):
                        self._usage = event["usage"]
                    for choice in event.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece:
                            if first_piece_at is None:
                                first_piece_at = time.perf_counter()
                            pieces.append(piece)
                            turn.answer = "".join(pieces)
                            yield piece
                        reason = choice.get("finish_reason")
                        if reason:
                            stats.stopped_by = "max_tokens" if reason == "length" else "stop_token"
                    if should_stop is not None and should_stop():
                        stats.stopped_by = "cancelled"
                        break
        finally:
            ended = time.perf_counter()
            turn.answer = "".join(pieces)
            self._fill(stats, started, first_piece_at, ended)
            turn.stats = stats.to_dict()
            if pieces or stats.stopped_by != "cancelled":
                self.turns.append(turn)

    def answer(self, question: str, sampling=None, **kwargs) -> tuple[str, object]:
        from salachat.engine.generate import Stats

        stats = kwargs.pop("stats", None) or Stats()
        return "".join(self.ask(question, sampling, stats=stats, **kwargs)), stats

    def _fill(self, stats, started: float, first_piece_at: float | None, ended: float) -> None:
        usage = self._usage
        stats.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        stats.generated_tokens = int(usage.get("completion_tokens") or 0)
        stats.extra["cached_tokens"] = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        first = first_piece_at if first_piece_at is not None else ended
        stats.first_token_seconds = stats.prefill_seconds = first - started
        stats.decode_seconds = ended - first

    # HTTP

    def _stream(self, body: dict):
        import contextlib

        import httpx

        @contextlib.contextmanager
        def opened():
            try:
                with self._client.stream("POST", self.url + "/chat/completions", json=body) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise _http_error(response)
                    yield response
            except httpx.TransportError as e:
                raise RemoteError(f"cannot reach {self.url}: {_reason(e)}", errors.FAILED) from None

        return opened()

    def _call(self, method: str, path: str) -> dict:
        import httpx

        try:
            response = self._client.request(method, self.url + path)
        except httpx.TransportError as e:
            raise RemoteError(f"cannot reach {self.url}: {_reason(e)}", errors.FAILED) from None
        if response.status_code >= 400:
            raise _http_error(response)
        try:
            return response.json()
        except ValueError:
            raise RemoteError(f"{self.url}{path} did not answer JSON: is it an OpenAI-compatible server?",
                              errors.FAILED) from None


def _events(response) -> Iterator[dict]:
    """The JSON objects of a server-sent event stream, until [DONE]."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, and comments such as salachat's reading progress
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            yield json.loads(data)
        except ValueError:
            raise RemoteError(f"the server sent an event that is not JSON: {data[:80]!r}", errors.FAILED) from None


def _error_from(body, status: int) -> RemoteError:
    error = body.get("error") if isinstance(body, dict) else None
    message = (error.get("message") if isinstance(error, dict) else error) or f"HTTP {status}"
    if status in (401, 403):
        code = errors.USAGE
    elif status == 404:
        code = errors.NO_SESSION if "session" in str(message) else errors.NO_MODEL
    elif status in (400, 413, 422):
        code = errors.USAGE
    else:
        code = errors.FAILED
    return RemoteError(f"the server answered {status}: {errors.one_line(str(message))}", code)


def _http_error(response) -> RemoteError:
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"message": response.text[:200] or response.reason_phrase}}
    return _error_from(body, response.status_code)


def _reason(error: BaseException) -> str:
    text = errors.one_line(str(error))
    return text or type(error).__name__
