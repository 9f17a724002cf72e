"""A conversation with documents: what the CLI, the TUI and the session store all drive.

The engine's cache can only grow (a Lightning state cannot be rewound), so the conversation feeds the model
exactly the text that the chat template adds at each step: `fed_text` is everything the cache has seen,
and each new turn feeds `template(messages)[len(fed_text):]`.
Reading a document is the first part of that: system prompt + the document, up to where the question goes.
Reading can stop between chunks and continue later (`pending_ids`), which is what crash-safe sessions use.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from salachat.engine import focus, long_context
from salachat.engine.generate import Progress, Sampling, Stats, generate, prefill
from salachat.engine.loader import LoadedModel

SYSTEM_PROMPT = (
    "You are salachat, an assistant that answers questions about the documents the user provides. "
    "Answer from the documents, briefly and exactly; say so when the documents do not contain the answer."
)
_QUESTION_SLOT = "\u0000QUESTION\u0000"
QUOTE_HEADER = "From the documents:"  # before a passage placed ahead of the question (Conversation._focus)


def trained_length(loaded: LoadedModel) -> int | None:
    """The length a dense model was trained on (None for MiniCPM-SALA, which reads any length)."""
    if hasattr(long_context, "trained_length"):
        return long_context.trained_length(loaded)
    if loaded.family == "llama":
        return loaded.model.args.max_position_embeddings
    return None


class ContextTooLong(Exception):
    """The documents or the conversation do not fit a dense model's trained length."""


@dataclass
class Turn:
    question: str
    answer: str
    stats: dict = field(default_factory=dict)
    quoted: str = ""  # the passage of the documents placed before the question (long-context focus)


class Conversation:
    def __init__(self, loaded: LoadedModel, system_prompt: str | None = None, chunk_size: int | None = None):
        if system_prompt is None:
            system_prompt = SYSTEM_PROMPT
            if loaded.asks_for_citations:
                from salachat.ingest import CITE_INSTRUCTION

                system_prompt += " " + CITE_INSTRUCTION
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.cache = loaded.new_cache()
        # a GPU reads fastest in large chunks (measured: 16K tokens); a CPU shows progress sooner in small ones
        self.chunk_size = chunk_size or (8192 if loaded.device.type == "cuda" else 512)
        self.system_prompt = system_prompt
        self.documents_text = ""  # rendered documents, placed before the first question
        self.turns: list[Turn] = []
        self.fed_text = ""
        self.pending_ids: list[int] = []  # tokens of the reading that are not yet in the cache
        self.document_tokens = 0  # system prompt + documents, as read
        self.reading_text = ""  # the reading as queued: system prompt + documents, up to the first question
        self._reading_ids = None  # its token ids (int32), for the long-context focus; made again after resume

    @classmethod
    def from_session_state(cls, state) -> Conversation:
        """The conversation a session store gives back (sessions.store.ConversationState's fields)."""
        conversation = cls(state.loaded, system_prompt=state.system_prompt, chunk_size=state.chunk_size)
        conversation.cache = state.cache
        conversation.documents_text = state.documents_text
        conversation.reading_text = state.reading_text
        conversation.fed_text = state.fed_text
        conversation.pending_ids = list(state.pending_ids)
        conversation.document_tokens = state.document_tokens
        conversation.turns = [Turn(t.question, t.answer, dict(t.stats), getattr(t, "quoted", "")) for t in state.turns]
        return conversation

    @property
    def _reading_text(self) -> str:  # the name the session store used before `reading_text`
        return self.reading_text

    @_reading_text.setter
    def _reading_text(self, text: str) -> None:
        self.reading_text = text

    @property
    def tokens_in_context(self) -> int:
        return self.cache.position

    @property
    def max_context(self) -> int | None:
        """Trained length of a dense model as trained; None where the model reads any length."""
        if self.loaded.long_context == "dense":
            return trained_length(self.loaded)
        return None

    def use_model(self, loaded: LoadedModel) -> None:
        """Read with `loaded` instead (the same weights with the long-context extension on): only before
        anything is read, since the cache starts again."""
        if self.cache.position:
            raise RuntimeError("the model can only change before the reading starts")
        self.loaded = loaded
        self.cache = loaded.new_cache()

    def clone(self) -> Conversation:
        """An independent copy: the engine state is copied tensor by tensor (a Lightning state cannot be
        rewound, so branching means copying), the transcript and the queued reading too."""
        from salachat.engine.cache import ModelCache

        twin = copy.copy(self)
        tensors, meta = self.cache.state()
        twin.cache = ModelCache.from_state({name: t.clone() for name, t in tensors.items()}, meta)
        twin.cache.extra = dict(self.cache.extra)
        twin.turns = [Turn(t.question, t.answer, dict(t.stats), t.quoted) for t in self.turns]
        twin.pending_ids = list(self.pending_ids)
        return twin

    def _focus(self, question: str) -> str:
        """Past a dense model's trained length: point the long-context layers at the document blocks the
        question's words are about (engine/focus.py) and return their text, which goes before the question.
        Read from memory at a far distance the default model often gets a number's digits wrong (passkey 2 of
        5 at 64K, docs/architecture.md); the same words right before the question are read at positions it
        knows. Quoted is the paragraph of those blocks around the line that matches the question best
        (focus.quote). "" where the extension is off, the question still starts inside the trained length (where the
        dense model's answer is kept exactly), or no block shares a word with the question."""
        params = self.loaded.sparse
        if self.loaded.long_context != "extended" or not self.document_tokens or params is None:
            return ""
        ids = self.reading_ids()
        blocks = long_context.focus_on(self.cache, ids, self.tokenizer.encode(question), self.tokenizer)
        if not blocks or self.cache.position < params.dense_len:
            return ""
        first, last = min(blocks), max(blocks)  # the blocks of one span: adjacent
        text = self.tokenizer.decode(ids[first * params.block_size : (last + 1) * params.block_size].tolist())
        return focus.quote(text, question)

    def reading_ids(self) -> torch.Tensor:
        """The token ids of the reading (what the cache's first `document_tokens` positions hold)."""
        if self._reading_ids is None or self._reading_ids.numel() != self.document_tokens:
            ids = self.tokenizer.encode(self.reading_text, add_bos=True)[: self.document_tokens]
            self._reading_ids = torch.tensor(ids, dtype=torch.int32)
        return self._reading_ids

    def _messages(self, next_question: str | None, next_quoted: str = "") -> list[dict]:
        messages = [{"role": "system", "content": self.system_prompt}]
        questions = [(t.question, t.quoted) for t in self.turns]
        if next_question is not None:
            questions.append((next_question, next_quoted))
        for i, (question, quoted) in enumerate(questions):
            content = f"{QUOTE_HEADER}\n{quoted}\n\n{question}" if quoted else question
            if i == 0 and self.documents_text:
                content = f"<documents>\n{self.documents_text}\n</documents>\n\n{content}"
            messages.append({"role": "user", "content": content})
            if i < len(self.turns):
                messages.append({"role": "assistant", "content": self.turns[i].answer})
        return messages

    def _delta(self, full: str) -> str:
        if full.startswith(self.fed_text):
            return full[len(self.fed_text) :]
        # The template rewrote earlier text (some strip answers): feed from where the two diverge.
        common = 0
        for a, b in zip(full, self.fed_text):
            if a != b:
                break
            common += 1
        return full[common:]

    def _check_room(self, new_tokens: int) -> None:
        limit = self.max_context
        if limit is not None and self.cache.position + new_tokens > limit:
            raise ContextTooLong(
                f"{self.cache.position + new_tokens} tokens do not fit the model's {limit}-token context: "
                "add --sparse to read past it with the long-context extension, or use a MiniCPM-SALA model"
            )

    def set_documents(self, documents_text: str) -> int:
        """Queue the documents for reading; returns the number of tokens to read."""
        if self.turns or self.fed_text:
            raise RuntimeError("documents are read before the first question")
        self.documents_text = documents_text
        full = self.tokenizer.apply_chat_template(self._messages(_QUESTION_SLOT), add_generation_prompt=True)
        reading_text = full[: full.index(_QUESTION_SLOT)]
        self.pending_ids = self.tokenizer.encode(reading_text, add_bos=True)
        self._reading_ids = torch.tensor(self.pending_ids, dtype=torch.int32)
        self.document_tokens = len(self.pending_ids)
        self.reading_text = reading_text
        self._check_room(len(self.pending_ids))  # after the fields: a caller may switch to the extension
        return len(self.pending_ids)

    def read(
        self,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_chunk: Callable[[Conversation], None] | None = None,
    ) -> None:
        """Feed the queued reading into the cache, chunk by chunk; resumable after Cancelled."""
        total = len(self.pending_ids) + self.cache.position

        def advance(_cache):
            del self.pending_ids[: self.chunk_size]
            if not self.pending_ids:
                self.fed_text = self.reading_text
            if on_chunk is not None:
                on_chunk(self)

        def report(done, _total, elapsed):
            if progress is not None:
                progress(total - len(self.pending_ids), total, elapsed)

        if self.pending_ids:
            prefill(
                self.loaded.model, list(self.pending_ids), self.cache, self.chunk_size, report, should_stop, advance
            )

    def ask(
        self,
        question: str,
        sampling: Sampling | None = None,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
        stats: Stats | None = None,
    ) -> Iterator[str]:
        """Stream the answer to `question`. Reads any unread part of the documents first."""
        sampling = sampling if sampling is not None else Sampling()
        if self.pending_ids:
            self.read(progress, should_stop)
        quoted = self._focus(question)
        full = self.tokenizer.apply_chat_template(self._messages(question, quoted), add_generation_prompt=True)
        delta = self._delta(full)
        prompt_ids = self.tokenizer.encode(delta, add_bos=not self.fed_text)
        self._check_room(len(prompt_ids) + sampling.max_tokens)
        stats = stats if stats is not None else Stats()
        pieces: list[str] = []
        turn = Turn(question, "", quoted=quoted)
        self.turns.append(turn)  # the question is in the cache from here on, whatever happens next
        self.fed_text = full[: len(full) - len(delta)] + delta
        try:
            for piece in generate(
                self.loaded.model, self.tokenizer, prompt_ids, self.cache, sampling,
                chunk_size=self.chunk_size, should_stop=should_stop, stats=stats,
            ):
                pieces.append(piece)
                turn.answer = "".join(pieces)
                yield piece
        finally:
            turn.answer = "".join(pieces)
            turn.stats = stats.to_dict()
            self.fed_text += turn.answer
            if stats.stopped_by == "stop_token":
                # The stop token is in the cache too; its text closes the assistant turn.
                self.fed_text += self.tokenizer.decode([stats.extra["stop_id"]], skip_special=False)
