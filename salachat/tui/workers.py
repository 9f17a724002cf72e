"""What the chat window's worker threads run: the model, the documents, the session. No Textual here.

Everything below blocks (loading weights, reading, generating), so the app calls it from thread workers
only; progress comes back through plain callbacks that the app forwards with `call_from_thread`.
The wiring mirrors `salachat ask` and `salachat resume` by calling their helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Options:
    paths: list[Path] = field(default_factory=list)
    session: str | None = None  # save as (or continue) this session
    model: str | None = None
    device: str = "auto"
    quant: str | None = None
    max_tokens: int = 512
    temperature: float = 0.0
    chunk_size: int | None = None  # tokens per reading step (None: the engine's default for the device)


@dataclass
class Context:
    """What the side panel's gauge shows."""

    tokens: int
    limit: int | None
    state_bytes: int
    device: str


class Chat:
    """One conversation with its model, documents and (optionally) the session it is saved in."""

    def __init__(self, options: Options, loaded=None):
        self.options = options
        self.loaded = loaded  # tests pass the model in, loaded once
        self.conversation = None
        self.documents = None
        self.writer = None  # a SessionWriter when the conversation is saved
        self.document_lines: list[str] = []  # "sample.pdf · 5 pages · 659 tokens"

    @property
    def session_name(self) -> str | None:
        return self.writer.folder.name if self.writer is not None else None

    def open(self, session: str | None = None) -> None:
        """Load the model if needed, then the session `session` (or the options' documents / session)."""
        from salachat.conversation import Conversation

        options = self.options
        name = session or (options.session if not options.paths else None)
        self._load_model(name)
        self.writer, self.documents, self.document_lines = None, None, []
        if name is not None:
            self._open_session(name)
        elif options.paths:
            self._open_documents()
        else:
            self.conversation = Conversation(self.loaded, chunk_size=options.chunk_size)

    def _load_model(self, session: str | None) -> None:
        from salachat import cli_sessions

        if self.loaded is not None:
            return
        options = self.options
        if session is not None:  # the model the session was read with, quantised the same way
            self.loaded = cli_sessions._load_for(cli_sessions._manifest(session), options.model, options.device,
                                                 spinner=False)
        else:
            from salachat.cli import _load

            self.loaded = _load(options.model, options.device, options.quant, False, spinner=False)

    def _open_session(self, name: str) -> None:
        from salachat import cli_sessions
        from salachat.sessions import SessionError, SessionWriter, load_conversation

        folder = cli_sessions._folder(name)
        try:
            self.conversation, _ = load_conversation(folder, self.loaded)
        except SessionError as e:
            raise cli_sessions._user_error(e) from None
        if self.options.chunk_size:
            self.conversation.chunk_size = self.options.chunk_size
        self.writer = SessionWriter(folder)
        manifest = cli_sessions._manifest(name)
        self.document_lines = [_document_line(d.get("source", "?"), d.get("kind"), d.get("segments"), None)
                               for d in manifest.get("documents", [])]

    def _open_documents(self) -> None:
        from salachat import ingest
        from salachat import cli_sessions, errors
        from salachat.conversation import ContextTooLong, Conversation
        from salachat.documents import load_documents
        from salachat.errors import UserError

        options = self.options
        self.documents = load_documents(options.paths)
        summary = ingest.summarize(self.documents.docs, self.loaded.tokenizer.encode)
        self.document_lines = [_document_line(d.source, d.kind, d.segments, d.tokens) for d in summary.documents]
        if options.session:
            self.conversation, self.writer = cli_sessions.conversation_for_ask(options.session, self.documents,
                                                                               self.loaded)
            if options.chunk_size:
                self.conversation.chunk_size = options.chunk_size
            return
        self.conversation = Conversation(self.loaded, chunk_size=options.chunk_size)
        try:
            self.conversation.set_documents(self.documents.prompt_text)
        except ContextTooLong as e:
            raise UserError(str(e), errors.BAD_INPUT) from None

    def read(self, progress: Callable[[int, int, float], None], should_stop: Callable[[], bool]) -> str:
        """Read what is queued; returns the status line. A stop keeps what was read (saved, with a session)."""
        from salachat.engine.generate import Cancelled
        from salachat import cli_sessions

        conversation = self.conversation
        if not conversation.pending_ids:
            return f"session {self.session_name}: ready" if self.writer else "ready"
        try:
            if self.writer is not None:
                cli_sessions.read_with_checkpoints(conversation, self.writer, quiet=True, progress=progress,
                                                   should_stop=should_stop)
            else:
                conversation.read(progress, should_stop=should_stop)
        except Cancelled:
            resume = f"; `salachat resume {self.session_name}` continues" if self.writer else ""
            return f"reading stopped at {conversation.tokens_in_context:,} tokens{resume}"
        return f"read {conversation.document_tokens:,} tokens: ask away"

    def ask(self, question: str, should_stop: Callable[[], bool], stats) -> Iterator[str]:
        """Stream the answer; the turn is saved when the stream ends (however it ends), with a session."""
        from salachat.engine.generate import Sampling
        from salachat import cli_sessions

        sampling = Sampling(temperature=self.options.temperature, max_tokens=self.options.max_tokens)
        try:
            yield from self.conversation.ask(question, sampling, should_stop=should_stop, stats=stats)
        finally:
            if self.writer is not None and self.conversation.turns:
                cli_sessions.save(self.writer, self.conversation)

    def context(self) -> Context:
        """Tokens in context and the bytes the engine's state holds (the sum over its caches' tensors)."""
        conversation = self.conversation
        tensors, _ = conversation.cache.state()
        return Context(tokens=conversation.tokens_in_context, limit=conversation.max_context,
                       state_bytes=sum(t.nbytes for t in tensors.values()), device=self.loaded.device.type.upper())


def _document_line(source: str, kind: str | None, segments: int | None, tokens: int | None) -> str:
    unit = {"pdf": "pages", "repo": "files", "epub": "chapters"}.get(kind or "", "parts")
    parts = [Path(source).name or source]
    if segments is not None:
        parts.append(f"{segments} {unit}")
    if tokens is not None:
        parts.append(f"{tokens:,} tokens")
    return " · ".join(parts)
