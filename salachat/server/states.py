"""The engine states the server keeps between requests, so that no document is read twice.

A Lightning state cannot be rewound, so a state is only useful to a request whose conversation begins with
exactly what the state has read. The server keeps states at the message boundaries a follow-up branches
from, each a ChatSession (salachat.chat) keyed by what it holds: (system prompt, documents, exchanges).

- After reading a request's documents, a fork is kept: every later question about those documents starts
  from it (forking copies the state; the reading is the expensive part). A long system prompt without a
  documents block (a client that sends the document there) is read and kept the same way.
- After an answer, the conversation itself is kept: the next turn of that conversation continues it. It is
  taken, not copied, when continued (another branch from the same history would re-read only the turns,
  not the documents, since the documents' fork is still kept).
- A saved session named by a request is loaded once and kept like a reading (never written back: the
  server serves it read-only and takes no lock on it).

Memory is bounded: at most `max_states` states and `max_bytes` bytes of state, least recently used first
out. Everything here runs on the one model thread.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from salachat.server.protocol import ApiError, ChatRequest

Key = tuple  # (system prompt or None, documents, ((question, answer), …))
SYSTEM_PROMPT_READING_CHARS = 2000  # about 500 tokens of prose: a system prompt this long is read and kept apart


@dataclass
class Kept:
    session: object  # salachat.chat.ChatSession
    kind: str  # "documents" | "answer" | "session"
    source: str  # what usage reports for tokens reused from it: "memory" | "session:NAME"
    nbytes: int
    tag: tuple | None = None  # (name, manifest checksum) of a saved session


@dataclass
class Checkout:
    """What a request starts from: a ChatSession holding the first `len(key[2]) - len(to_feed)` exchanges."""

    session: object
    key: Key  # the request's whole conversation before its question
    to_feed: list[tuple[str, str]] = field(default_factory=list)  # exchanges the state has not read yet
    cached_tokens: int = 0
    source: str = "new"
    fresh_documents: bool = False  # documents queued for reading here: keep a fork once they are read


def _state_bytes(session) -> int:
    tensors, _ = session.conversation.cache.state()
    return sum(t.nbytes for t in tensors.values())


class StateStore:
    def __init__(self, loaded, *, max_states: int = 4, max_bytes: int = 8 << 30, reuse: bool = True):
        self.loaded = loaded
        self.max_states, self.max_bytes, self.reuse = max_states, max_bytes, reuse
        self.kept: OrderedDict[Key, Kept] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self.kept)

    @property
    def nbytes(self) -> int:
        # list() copies the values in one step under the GIL: /health reads this while the model thread edits
        return sum(k.nbytes for k in list(self.kept.values()))

    # what a request starts from

    def checkout(self, request: ChatRequest) -> Checkout:
        if request.session is not None:
            base_key = self._saved_session(request.session)
            key = (base_key[0], base_key[1], base_key[2] + tuple(_after_session(request, base_key)))
        else:
            key = (request.system_prompt, request.documents, tuple(request.exchanges))
        best = self._best(key) if self.reuse else None
        if best is None:
            return self._fresh(key)
        kept = self.kept[best]
        if kept.kind == "answer":
            del self.kept[best]
            session = kept.session
        else:
            self.kept.move_to_end(best)
            self._make_room(kept.nbytes, spare=best)
            session = kept.session.fork()
        return Checkout(session, key, list(key[2][len(best[2]) :]), session.conversation.cache.position, kept.source)

    def _best(self, key: Key) -> Key | None:
        """The kept state holding the longest beginning of `key`'s exchanges (the newest among equals)."""
        best = None
        for kept_key in reversed(self.kept):
            same_start = kept_key[0] == key[0] and kept_key[1] == key[1]
            n = len(kept_key[2])
            if same_start and key[2][:n] == kept_key[2] and (best is None or n > len(best[2])):
                best = kept_key
        return best

    def _fresh(self, key: Key) -> Checkout:
        from salachat.chat import ANSWER_ROOM, ChatSession, with_long_context
        from salachat.conversation import ContextTooLong, Conversation, trained_length

        system_prompt, documents, exchanges = key
        conversation = Conversation(self.loaded, system_prompt=system_prompt)
        # clients that put the document in the system prompt: its reading is kept like a documents block's
        long_system = not documents and len(system_prompt or "") >= SYSTEM_PROMPT_READING_CHARS
        if documents or long_system:
            try:
                tokens = conversation.set_documents(documents)
            except ContextTooLong:
                if self.loaded.long_context != "dense":
                    raise
                tokens = conversation.document_tokens
            limit = trained_length(self.loaded)
            if self.loaded.long_context == "dense" and limit and tokens + ANSWER_ROOM > limit:
                # as ChatSession.open does: documents past a dense model's trained length turn the extension on
                conversation = Conversation(with_long_context(self.loaded), system_prompt=system_prompt)
                conversation.set_documents(documents)
        return Checkout(ChatSession(conversation), key, list(exchanges), fresh_documents=bool(documents) or long_system)

    # what is kept after a request

    def keep_reading(self, checkout: Checkout) -> None:
        """Called once the documents are read, before any exchange is fed: a fork to branch from later."""
        if self.reuse and checkout.fresh_documents:
            key = (checkout.key[0], checkout.key[1], ())
            nbytes = _state_bytes(checkout.session)
            if self._make_room(nbytes):
                self._put(key, Kept(checkout.session.fork(), "documents", "memory", nbytes))

    def keep_answer(self, checkout: Checkout) -> None:
        """Called after an answer that ended normally: the conversation, keyed by what its cache holds."""
        if not self.reuse:
            return
        session = checkout.session
        last = session.turns[-1]
        key = (checkout.key[0], checkout.key[1], checkout.key[2] + ((last.question, last.answer),))
        nbytes = _state_bytes(session)
        if self._make_room(nbytes):
            self._put(key, Kept(session, "answer", checkout.source if checkout.source != "new" else "memory", nbytes))

    def _put(self, key: Key, kept: Kept) -> None:
        self.kept.pop(key, None)
        self.kept[key] = kept
        while len(self.kept) > self.max_states:
            self.kept.popitem(last=False)

    def _make_room(self, nbytes: int, spare: Key | None = None) -> bool:
        """Evict least recently used states (not `spare`) until `nbytes` more fit; False if they never can."""
        if nbytes > self.max_bytes:
            return False
        for key in list(self.kept):
            if self.nbytes + nbytes <= self.max_bytes:
                break
            if key != spare:
                del self.kept[key]
        return self.nbytes + nbytes <= self.max_bytes

    # saved sessions

    def _saved_session(self, name: str) -> Key:
        """The key of saved session NAME, loaded into the store if it is not there (or changed on disk)."""
        from salachat.paths import sessions_dir
        from salachat.sessions import SessionError, read_manifest, session_folder

        try:
            folder = session_folder(sessions_dir(), name)
            manifest = read_manifest(folder)
        except SessionError as e:
            raise ApiError(404, str(e), code="model_not_found", param="model") from None
        tag = (name, manifest.get("checksum"))
        for key, kept in self.kept.items():
            if kept.tag == tag:
                return key
        for key in [k for k, kept in self.kept.items() if kept.tag is not None and kept.tag[0] == name]:
            del self.kept[key]  # an older save of the same session
        session = self._load_saved(folder, manifest)
        conversation = session.conversation
        key = (conversation.system_prompt, conversation.documents_text,
               tuple((t.question, t.answer) for t in conversation.turns))
        nbytes = _state_bytes(session)
        if not self._make_room(nbytes):
            raise ApiError(507, f"session {name!r} holds {nbytes / 2**30:.1f} GiB of state, more than the server "
                           f"keeps ({self.max_bytes / 2**30:.1f} GiB): restart it with a larger --state-gb",
                           type="server_error", code="insufficient_storage")
        self._put(key, Kept(session, "session", f"session:{name}", nbytes, tag))
        return key

    def _load_saved(self, folder, manifest):
        from salachat.chat import ChatSession, with_long_context
        from salachat.sessions import SessionError, load_conversation

        model = manifest.get("model", {})
        mode = model.get("long_context") or manifest.get("long_context")
        if mode is None:  # older sessions say it in the fingerprint only
            mode = "extended" if "sparse" in str(model.get("fingerprint", "")).split("+")[1:] else "dense"
        loaded = with_long_context(self.loaded) if mode == "extended" else self.loaded
        try:
            conversation, _ = load_conversation(folder, loaded)
        except SessionError as e:
            raise ApiError(404, str(e), code="model_not_found", param="model") from None
        return ChatSession(conversation)


def _after_session(request: ChatRequest, base_key: Key) -> list[tuple[str, str]]:
    """A request naming a saved session sends the turns after the session's; one that repeats the session's
    own transcript first (a client that keeps the whole history) has that part dropped."""
    system_prompt, documents, turns = base_key
    if request.system_prompt is not None and request.system_prompt != system_prompt:
        raise ApiError(400, "a saved session keeps its own system prompt: leave the system message out",
                       param="messages")
    if request.documents and request.documents != documents:
        raise ApiError(400, "a saved session keeps its own documents: send only the questions", param="messages")
    exchanges = list(request.exchanges)
    if request.documents or (turns and tuple(exchanges[: len(turns)]) == turns):
        if tuple(exchanges[: len(turns)]) != turns:
            raise ApiError(400, "the messages repeat the session's documents but not its transcript: send only "
                           "the questions after it", param="messages")
        exchanges = exchanges[len(turns) :]
    return exchanges
