"""One model, one sequence at a time: requests wait in order, and a stopped client frees the model at once.

The model runs on one thread of its own. A request becomes a Job in a bounded first-in-first-out queue; the
thread takes jobs one by one and sends what happens back to the job's asyncio queue (reading progress,
the answer's pieces, the end with its usage, or an error). A job's `cancel()` is checked between chunks
of the reading and between tokens of the answer, so a client that goes away stops the model within one
token, and a job cancelled while it waits is never started.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass

from salachat.server.protocol import ApiError, ChatRequest, StopSequences, Usage
from salachat.server.states import StateStore


@dataclass
class Event:
    kind: str  # "started" | "progress" | "piece" | "done" | "error" | "cancelled"
    text: str = ""
    done: int = 0  # progress: tokens read so far of `total`
    total: int = 0
    finish_reason: str = ""
    usage: Usage | None = None
    error: ApiError | None = None


class Job:
    def __init__(self, request: ChatRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = loop
        self._cancelled = threading.Event()
        self.shutting_down = False

    def cancel(self, shutting_down: bool = False) -> None:
        self.shutting_down = self.shutting_down or shutting_down
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def send(self, event: Event) -> None:
        """From the model thread: hand the event to the request's coroutine."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            self.cancel()


class QueueFull(Exception):
    pass


class Runner:
    def __init__(self, states: StateStore, max_waiting: int = 32):
        self.states = states
        self.max_waiting = max_waiting
        self.waiting: collections.deque[Job] = collections.deque()
        self.current: Job | None = None
        self.served = 0
        self.cancelled = 0
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="salachat-model", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> int:
        """Queue `job`; its place in the queue (0: next). QueueFull past `max_waiting` waiting jobs."""
        with self._wake:
            for gone in [j for j in self.waiting if j.cancelled]:  # clients that left free their places
                self.waiting.remove(gone)
                self._end_cancelled(gone)
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(len(self.waiting))
            self.waiting.append(job)
            self._wake.notify()
            return len(self.waiting) - 1

    def close(self) -> None:
        with self._wake:
            self._closed = True
            for job in [*self.waiting, *([self.current] if self.current else [])]:
                job.cancel(shutting_down=True)
            self._wake.notify()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self.waiting and not self._closed:
                    self._wake.wait()
                if self._closed:
                    for job in self.waiting:
                        self._end_cancelled(job)
                    self.waiting.clear()
                    return
                job = self.current = self.waiting.popleft()
            try:
                if job.cancelled:
                    self._end_cancelled(job)
                    continue
                self._run(job)
            finally:
                with self._wake:
                    self.current = None

    def _end_cancelled(self, job: Job) -> None:
        self.cancelled += 1
        if job.shutting_down:
            job.send(Event("error", error=ApiError(503, "the server is shutting down", type="server_error",
                                                   code="shutting_down")))
        else:
            job.send(Event("cancelled"))  # the request's coroutine ends too (its client has gone)

    def _run(self, job: Job) -> None:
        from salachat import errors
        from salachat.conversation import Turn
        from salachat.engine.generate import Cancelled, Stats

        request = job.request
        stops = StopSequences(request.stop)
        stopped_by_sequence = False

        def should_stop() -> bool:
            return job.cancelled or stops.stopped

        def progress(done: int, total: int, _seconds: float) -> None:
            job.send(Event("progress", done=done, total=total))

        try:
            checkout = self.states.checkout(request)
            session = checkout.session
            job.send(Event("started"))  # the request is valid: a stream may start
            if session.pending_tokens:
                job.send(Event("progress", done=0, total=session.pending_tokens))
                session.read(progress, should_stop)
                self.states.keep_reading(checkout)
            for question, answer in checkout.to_feed:  # history the state has not read: fed with the question
                session.turns.append(Turn(question, answer))
            read_before_question = session.conversation.cache.position
            stats = Stats()
            for piece in session.ask(request.question, request.sampling, should_stop=should_stop, stats=stats):
                text = stops.push(piece)
                if text:
                    job.send(Event("piece", text=text))
            tail = stops.flush()
            if tail:
                job.send(Event("piece", text=tail))
            stopped_by_sequence = stops.stopped
        except Cancelled:
            self._end_cancelled(job)
            return
        except ApiError as e:
            job.send(Event("error", error=e))
            return
        except Exception as e:  # every failure reaches the client as one line, never a traceback
            job.send(Event("error", error=api_error(e)))
            if errors.debug():
                raise
            return
        if job.cancelled:
            self._end_cancelled(job)
            return
        self.served += 1
        if stats.stopped_by in ("stop_token", "max_tokens") and not stopped_by_sequence:
            self.states.keep_answer(checkout)
        usage = Usage(prompt_tokens=read_before_question + stats.prompt_tokens,
                      completion_tokens=stats.generated_tokens, cached_tokens=checkout.cached_tokens,
                      state=checkout.source)
        finish = "length" if stats.stopped_by == "max_tokens" and not stopped_by_sequence else "stop"
        job.send(Event("done", finish_reason=finish, usage=usage))


def api_error(error: BaseException) -> ApiError:
    """The library's one table of errors (salachat.errors.classify), as HTTP statuses."""
    from salachat import errors

    failure = errors.classify(error)
    if failure.code in (errors.USAGE, errors.BAD_INPUT):
        too_long = type(error).__name__ == "ContextTooLong"
        return ApiError(400, failure.message, code="context_length_exceeded" if too_long else failure.kind)
    if failure.code == errors.NO_SESSION:
        return ApiError(404, failure.message, code="model_not_found", param="model")
    message = failure.message if failure.expected else f"the model failed: {failure.message}"
    return ApiError(500, message, type="server_error", code=failure.kind)
