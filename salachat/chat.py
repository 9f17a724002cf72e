"""ChatSession: the product's use-cases in one library, under thin faces (the CLI, the chat window, the server).

A ChatSession is one conversation with its model, its documents and (optionally) the saved session it lives
in. It holds no Rich, Textual or HTTP code: progress, notes and cancellation are plain callbacks, answers a
generator of text pieces, and failures the library's own exceptions, which `salachat.errors.classify` turns
into one line and an exit code for every face.

    session = ChatSession.open(model=None, paths=["book.pdf"], session="book")   # or ChatSession.resume("book")
    session.read(progress=lambda done, total, seconds: ...)          # checkpointed into the session as it reads
    stats = Stats()
    for piece in session.ask("Who kept the light?", Sampling(), stats=stats):
        print(piece, end="")                                          # saved when the answer ends
    session.context()                                                 # tokens used, limit, long-context mode

Opening
    `open(...)` loads the model (or takes `loaded=`, a LoadedModel opened once and shared), reads the
    documents (`paths`, or `documents=` already read, or `text=` for stdin) and queues them for reading.
    With `session=NAME` the conversation is saved there: a NAME that read the same documents with the same
    model continues, one that holds other documents is refused (SessionError). `resume(NAME)` opens a
    saved session with the model, quantisation and long-context mode it was read with.
Long context
    `long_context="auto"` (the default): when the documents do not fit a dense model's trained length, the
    training-free extension is turned on and `on_note` gets one line saying so; "on" forces it (--sparse),
    "off" refuses with ContextTooLong instead. `context().long_context` is "dense", "extended" or "native".
Reading
    `read(progress, should_stop)` feeds the queued reading in chunks. A stop (`should_stop()` returning
    True) raises engine.generate.Cancelled between chunks, where the state is consistent: a saved session
    keeps what was read and `resume` continues it. Ctrl-C raises errors.Interrupted, whose message says
    what was kept. `ask` reads whatever is still queued first, with the same progress callback.
Asking
    `ask(question, sampling, progress=, should_stop=, stats=)` streams the answer's text pieces; `stats`
    (engine.generate.Stats) is filled when the stream ends. The turn stays in the conversation however the
    stream ends (a stop after three tokens keeps those three), and is saved with a session.
Branching
    `fork()` returns an independent ChatSession with a copy of the engine state and transcript, not saved
    anywhere (`save_as(NAME)` gives it a session). The engine state cannot be rewound (Lightning layers keep
    a running state), so a caller that may continue from an earlier message boundary forks there and keeps
    the fork; the copy costs the state's bytes (`context().state_bytes`). `turns` lists the messages so far.
Threads
    A ChatSession is used from one thread at a time; `should_stop` may be flipped from any thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from salachat import errors

Progress = Callable[[int, int, float], None]  # (tokens read, tokens to read in all, seconds)
Note = Callable[[str], None]
LONG_CONTEXT_MODES = ("auto", "on", "off")
# Room left for a question and its answer when deciding that documents fit a dense model's trained length
# (an eighth of it for short-context models).
ANSWER_ROOM = 1024
COUNT_CHARS = 4_000_000  # documents up to this many characters get their own token count in document_lines


@dataclass(frozen=True)
class Context:
    """What the conversation holds: the gauge of the chat window, `usage` of the server."""

    tokens: int  # tokens in the engine state
    pending_tokens: int  # tokens queued for reading, not yet read
    document_tokens: int  # system prompt + documents, as read
    limit: int | None  # the model's trained length while it reads densely; None: any length
    trained_length: int | None  # the model's trained length, whatever the mode
    long_context: str  # "dense" | "extended" | "native"
    state_bytes: int  # bytes of the engine state (all caches' tensors)
    device: str  # "CPU" | "CUDA"


@dataclass(frozen=True)
class DocumentLine:
    source: str
    kind: str | None
    segments: int | None
    tokens: int | None

    def __str__(self) -> str:
        unit = {"pdf": "pages", "repo": "files", "epub": "chapters"}.get(self.kind or "", "parts")
        parts = [Path(self.source).name or self.source]
        if self.segments is not None:
            parts.append(f"{self.segments} {unit}")
        if self.tokens is not None:
            parts.append(f"{self.tokens:,} tokens")
        return " · ".join(parts)


def open_model(spec: str | None = None, device: str = "auto", quant: str | None = None, dtype=None):
    """The LoadedModel for a name, a GGUF file or a Hugging Face folder (dense: see `with_long_context`)."""
    if quant not in (None, "int8", "nf4"):
        raise errors.UsageError(f"--quant {quant}: choose int8 or nf4")
    from salachat import models

    kwargs = {"device": device, "quant": quant}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return models.open_model(spec, **kwargs)


def with_long_context(loaded):
    """The same model with the training-free long-context extension on; `loaded` itself is left as it is
    (a model opened once may serve dense and extended conversations)."""
    from salachat.engine import long_context
    from salachat.engine.loader import ModelLoadError

    if loaded.long_context != "dense":  # extended already, or MiniCPM-SALA, which reads any length natively
        return loaded
    if loaded.family != "llama":
        raise ModelLoadError("the long-context extension applies to Llama-family models")
    extended = dataclasses.replace(loaded)
    long_context.enable(extended)
    return extended


def _sessions_dir() -> Path:
    from salachat.sessions import sessions_root

    return sessions_root()  # private (0700), and a data folder that cannot be used is one SessionError


def _session_folder(name: str) -> Path:
    from salachat.sessions import session_folder

    return session_folder(_sessions_dir(), name)


def read_documents(paths: list[Path | str], password: str | None = None, text: bytes | str | None = None,
                   text_name: str = "stdin"):
    """salachat.documents.Documents from paths, plus `text` (what stdin held: text, or a PDF's bytes) as
    one more document named `text_name`."""
    from salachat.documents import load_documents

    paths = [Path(p) for p in paths]
    if text is None:
        return load_documents(paths, password=password)
    import tempfile

    # ingest reads files: stdin goes through a private temporary file, named as the user knows it
    with tempfile.TemporaryDirectory(prefix="salachat-") as tmp:
        stdin_file = Path(tmp) / text_name
        stdin_file.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
        documents = load_documents([*paths, stdin_file], password=password)
    for doc in documents.docs:
        if doc.source == str(stdin_file):
            doc.source = text_name
    from salachat import ingest

    documents.prompt_text = ingest.render_prompt(documents.docs)
    return documents


class ChatSession:
    """One conversation: its model, documents and saved session. See the module's docstring."""

    def __init__(self, conversation, *, documents=None, writer=None, document_lines=None, notes=None):
        self.conversation = conversation  # salachat.conversation.Conversation: the state machine underneath
        self.documents = documents  # salachat.documents.Documents read in this process (None after resume)
        self.writer = writer  # a sessions.SessionWriter when the conversation is saved
        self._document_lines: list[DocumentLine] | None = None if document_lines is None else list(document_lines)
        self.notes: list[str] = list(notes or [])  # the lines `on_note` got (long-context switch …)

    @property
    def document_lines(self) -> list[DocumentLine]:
        """One line a document: name, pages (files, chapters) and tokens; counted on first use, since only
        the chat window shows them (tokens are left out of documents too long to count again cheaply)."""
        if self._document_lines is None:
            self._document_lines = [] if self.documents is None else _document_lines(
                self.documents, self.conversation.tokenizer)
        return self._document_lines

    @document_lines.setter
    def document_lines(self, lines: list[DocumentLine]) -> None:
        self._document_lines = list(lines)

    # opening

    @classmethod
    def open(
        cls,
        *,
        paths: list[Path | str] | None = None,
        documents=None,
        text: bytes | str | None = None,
        session: str | None = None,
        model: str | None = None,
        device: str = "auto",
        quant: str | None = None,
        dtype=None,
        long_context: str = "auto",
        system_prompt: str | None = None,
        password: str | None = None,
        chunk_size: int | None = None,
        loaded=None,
        on_note: Note | None = None,
    ) -> ChatSession:
        """Documents (paths / documents / text) and/or a session name; without documents, a saved `session`
        is resumed (as `resume`) and without either, an empty conversation starts."""
        if long_context not in LONG_CONTEXT_MODES:
            raise errors.UsageError(f"long-context mode {long_context!r}: choose {', '.join(LONG_CONTEXT_MODES)}")
        has_documents = bool(paths) or documents is not None or text is not None
        if session is not None:
            folder = _session_folder(session)  # a bad name fails before anything is loaded
            if not has_documents:
                return cls.resume(session, model=model, device=device, loaded=loaded, chunk_size=chunk_size,
                                  on_note=on_note)
        if has_documents and documents is None:
            documents = read_documents(paths or [], password=password, text=text)
        if loaded is None:
            loaded = open_model(model, device=device, quant=quant, dtype=dtype)
        notes: list[str] = []

        def note(line: str) -> None:
            notes.append(line)
            if on_note is not None:
                on_note(line)

        if long_context == "on":
            loaded = with_long_context(loaded)
        if session is not None and has_documents:
            existing = cls._continue(session, folder, documents, loaded, long_context, chunk_size, on_note)
            if existing is not None:
                return existing
        conversation = _new_conversation(loaded, documents, system_prompt, chunk_size, long_context, note)
        writer = None
        if session is not None:
            from salachat.sessions import SessionWriter

            writer = SessionWriter(folder, documents=documents.summary() if documents is not None else [])
        return cls(conversation, documents=documents, writer=writer, notes=notes)

    @classmethod
    def _continue(cls, name, folder, documents, loaded, long_context, chunk_size, on_note):
        """`ask --session NAME` again: continue NAME if it read these documents, refuse if others."""
        from salachat.sessions import SessionError, abandoned_before_first_save, read_manifest

        if not folder.exists() or abandoned_before_first_save(folder):
            return None
        manifest = read_manifest(folder)
        if [d["content_hash"] for d in manifest["documents"]] != [d["content_hash"] for d in documents.summary()]:
            raise SessionError(f"session {name!r} holds other documents: continue it with `salachat resume {name}`, "
                               f"or pick another name, or `salachat sessions rm {name}`")
        if _saved_long_context(manifest) == "extended":
            loaded = with_long_context(loaded)
        session = cls._load(name, folder, loaded, chunk_size)
        session.documents = documents
        session._document_lines = None  # counted from the documents read here, on first use
        return session

    @classmethod
    def resume(cls, name: str, *, model: str | None = None, device: str = "auto", loaded=None,
               chunk_size: int | None = None, on_note: Note | None = None) -> ChatSession:
        """A saved session, with the model it was read with (or `model`, if it moved) quantised and in the
        long-context mode it was read in. SessionError when it is missing or unreadable."""
        from salachat.sessions import read_manifest

        folder = _session_folder(name)
        manifest = read_manifest(folder)
        if loaded is None or (model is None and not _same_weights(loaded, manifest)):
            loaded = _model_for(manifest, model, device)
        extended = _saved_long_context(manifest) == "extended"
        if extended:
            loaded = with_long_context(loaded)
        session = cls._load(name, folder, loaded, chunk_size)
        lines = []  # kept in `notes` (the chat window's log shows them) and given to on_note
        if extended and loaded.family != "minicpm_sala":
            from salachat.conversation import trained_length

            tokens, limit = session.conversation.document_tokens, trained_length(loaded)
            lines.append(f"session {name!r} was read with the long-context extension ({tokens:,} tokens of documents"
                         + (f", past the model's trained {limit:,}" if limit and tokens > limit else "")
                         + "): answering with it")
        if session.pending_tokens:
            lines.append(f"continuing the reading of session {name!r}: {session.pending_tokens:,} tokens left")
        session.notes.extend(lines)
        for line in lines if on_note is not None else []:
            on_note(line)
        return session

    @classmethod
    def _load(cls, name, folder, loaded, chunk_size):
        from salachat.sessions import SessionWriter, load_conversation

        writer = SessionWriter(folder)  # takes the session's lock before its state is read
        conversation, manifest = load_conversation(folder, loaded)
        if chunk_size:
            conversation.chunk_size = chunk_size
        lines = [DocumentLine(d.get("source", "?"), d.get("kind"), d.get("segments"), None)
                 for d in manifest.get("documents", [])]
        return cls(conversation, writer=writer, document_lines=lines)

    # what it holds

    @property
    def loaded(self):
        return self.conversation.loaded

    @property
    def model_id(self) -> str:
        return self.conversation.loaded.model_id

    @property
    def session_name(self) -> str | None:
        return self.writer.folder.name if self.writer is not None else None

    @property
    def saved_tokens(self) -> int | None:
        """Tokens the session's last save holds; None when nothing was saved yet (or no session)."""
        if self.writer is None or not self.writer.manifest:
            return None
        return self.writer.manifest["tokens"]

    @property
    def pending_tokens(self) -> int:
        return len(self.conversation.pending_ids)

    @property
    def turns(self) -> list:
        """conversation.Turn(question, answer, stats) for each exchange so far."""
        return self.conversation.turns

    @property
    def manifest_documents(self) -> list[dict]:
        if self.documents is not None:
            return self.documents.summary()
        return list((self.writer.manifest or {}).get("documents", [])) if self.writer is not None else []

    def context(self) -> Context:
        conversation = self.conversation
        tensors, _ = conversation.cache.state()
        from salachat.conversation import trained_length

        return Context(tokens=conversation.tokens_in_context, pending_tokens=self.pending_tokens,
                       document_tokens=conversation.document_tokens, limit=conversation.max_context,
                       trained_length=trained_length(self.loaded), long_context=self.loaded.long_context,
                       state_bytes=sum(t.nbytes for t in tensors.values()), device=self.loaded.device.type.upper())

    def cited_passages(self, answer: str) -> list:
        """ingest.Passage for each anchor of `answer` that the documents hold (documents read here only)."""
        if self.documents is None:
            return []
        from salachat.documents import cited_passages

        return cited_passages(self.documents, answer)

    # reading and asking

    def read(self, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> None:
        """Read what is queued; with a session, checkpoint as it reads and save at the end."""
        from salachat.engine.generate import Cancelled

        conversation = self.conversation
        if not conversation.pending_ids:
            return
        on_chunk = None
        if self.writer is not None:
            from salachat.sessions import Checkpointer

            on_chunk = Checkpointer(self.writer.save)
        try:
            conversation.read(progress, should_stop=should_stop, on_chunk=on_chunk)
        except Cancelled:
            self.save()  # stopped between chunks: the state is consistent
            raise
        except KeyboardInterrupt:
            raise errors.Interrupted(self._interrupted_message()) from None
        self.save()

    def _interrupted_message(self) -> str:
        # the cache may be mid-chunk: the last checkpoint is kept rather than this state saved
        if self.writer is None:
            return "stopped."
        name, folder = self.writer.folder.name, self.writer.folder
        from salachat.sessions import SessionError, read_manifest

        try:  # what is on disk: Ctrl-C may have landed inside a save, after its manifest was written
            kept = read_manifest(folder)["tokens"]
        except SessionError:
            kept = None
        if kept is None:
            from salachat.sessions import abandoned_before_first_save

            if abandoned_before_first_save(folder):  # nothing to resume: leave no empty session behind
                for path in folder.iterdir():
                    path.unlink(missing_ok=True)
                folder.rmdir()
            return f"stopped before session {name!r} was first saved: nothing was kept"
        return f"stopped; session {name!r} keeps {kept:,} tokens read: `salachat resume {name}` continues the reading"

    def ask(self, question: str, sampling=None, *, progress: Progress | None = None,
            should_stop: Callable[[], bool] | None = None, stats=None) -> Iterator[str]:
        """Stream the answer's text pieces; reads what is still queued first (with `progress`)."""
        from salachat.engine.generate import Sampling

        if self.pending_tokens:
            self.read(progress, should_stop)
        sampling = sampling if sampling is not None else Sampling()
        interrupted = False
        try:
            yield from self.conversation.ask(question, sampling, should_stop=should_stop, stats=stats)
        except KeyboardInterrupt:
            # Ctrl-C may land inside a forward pass, with some layers' caches a token ahead: that state is
            # never saved, the session keeps its last save (before this question)
            interrupted = True
            kept = f"; session {self.session_name!r} keeps its last save" if self.saved_tokens is not None else ""
            raise errors.Interrupted(f"stopped; this answer was not saved{kept}") from None
        finally:
            if self.writer is not None and self.conversation.turns and not interrupted:
                self.save()

    def answer(self, question: str, sampling=None, **kwargs) -> tuple[str, object]:
        """The whole answer and its engine.generate.Stats (what `ask` streams, joined)."""
        from salachat.engine.generate import Stats

        stats = kwargs.pop("stats", None) or Stats()
        return "".join(self.ask(question, sampling, stats=stats, **kwargs)), stats

    # saving and branching

    def save(self) -> None:
        if self.writer is not None:
            self.writer.save(self.conversation)

    def save_as(self, name: str) -> None:
        """Save this conversation as a new session NAME (a fork, or a conversation opened without one)."""
        from salachat.sessions import SessionError, SessionWriter, abandoned_before_first_save

        folder = _session_folder(name)
        if folder.exists() and not abandoned_before_first_save(folder):
            raise SessionError(f"a session named {name!r} exists already: pick another name")
        self.writer = SessionWriter(folder, documents=self.manifest_documents)
        self.save()

    def fork(self) -> ChatSession:
        """An independent copy of the conversation at this message boundary, saved nowhere."""
        return ChatSession(self.conversation.clone(), documents=self.documents, writer=None,
                           document_lines=self._document_lines, notes=self.notes)


def _new_conversation(loaded, documents, system_prompt, chunk_size, long_context, note):
    from salachat.conversation import ContextTooLong, Conversation, trained_length

    conversation = Conversation(loaded, system_prompt=system_prompt, chunk_size=chunk_size)
    if documents is None:
        return conversation
    try:
        tokens = conversation.set_documents(documents.prompt_text)
    except ContextTooLong:
        if long_context != "auto":
            raise
        tokens = conversation.document_tokens
    limit = trained_length(loaded)
    if long_context == "auto" and loaded.long_context == "dense" and limit and \
            tokens + min(ANSWER_ROOM, limit // 8) > limit:
        conversation.use_model(with_long_context(loaded))
        past = "past" if tokens > limit else "with room for an answer, past"  # 7,845 tokens "past" 8,192 misread
        note(f"the documents are {tokens:,} tokens, {past} the model's trained {limit:,}: "
             "reading with the long-context extension")
    return conversation


def _document_lines(documents, tokenizer) -> list[DocumentLine]:
    """One line a document with its pages and tokens (counted one document at a time)."""
    from salachat import ingest

    lines = []
    for doc in documents.docs:
        tokens = len(tokenizer.encode(ingest.render_prompt([doc]))) if doc.text_chars <= COUNT_CHARS else None
        lines.append(DocumentLine(doc.source, doc.kind, len(doc.segments), tokens))
    return lines


def _saved_long_context(manifest: dict) -> str:
    """The long-context mode a session was read in (read_manifest fills it in for older sessions)."""
    return manifest["model"]["long_context"]


def _saved_quant(manifest: dict) -> str | None:
    return manifest["model"]["quant"]


def _same_weights(loaded, manifest: dict) -> bool:
    """Whether `loaded` is the model (weights and quantisation) a session was read with."""
    saved = manifest.get("model", {})
    base = str(saved.get("fingerprint", "")).split("+")[0]
    return loaded.fingerprint.split("+")[0] == base and loaded.quant == _saved_quant(manifest)


def _model_for(manifest: dict, model: str | None, device: str):
    """The model a session was read with (or `model`), quantised and in the dtype it was read in."""
    import torch

    from salachat.engine.loader import ModelLoadError

    saved = manifest["model"]
    dtype = getattr(torch, str(saved.get("dtype", "")), None)
    if not isinstance(dtype, torch.dtype) or saved.get("packed"):
        dtype = None  # a dtype would dequantise a GGUF the session was read with packed
    try:
        return open_model(model or saved["id"], device=device, quant=_saved_quant(manifest), dtype=dtype)
    except ModelLoadError as e:
        raise ModelLoadError(f"{e} (the session needs the model it was read with: --model PATH if it moved)") from None
