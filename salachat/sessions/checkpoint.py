"""When to checkpoint while reading: often enough to lose little on a crash, rarely enough to cost < 5%.

The interval is measured, not guessed: after each save we know what it cost, and the next one waits until
reading has taken `1 / budget` times as long. Saves are incremental (only the new KV tail), so their cost
grows with the tokens read since the last one, as does the reading time: the interval settles at the
number of tokens N whose fixed save overhead (fsyncs, manifest, Lightning states) is `budget` of reading N.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Checkpointer:
    """Pass as Conversation.read(on_chunk=...); saves through `save(conversation)` when the budget allows."""

    def __init__(self, save: Callable, budget: float = 0.04, every_tokens: int | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.save = save
        self.budget = budget
        self.every_tokens = every_tokens  # fixed interval (tests); None = measured
        self.clock = clock
        self.save_seconds = 0.0  # total spent saving
        self.saves = 0
        self.last_cost = 0.0
        self._since = clock()
        self._tokens_at_last = None
        self.intervals: list[int] = []  # tokens between checkpoints, as chosen

    def __call__(self, conversation) -> None:
        position = conversation.cache.position
        if self._tokens_at_last is None:
            self._tokens_at_last = position - conversation.chunk_size
        due = (position - self._tokens_at_last >= self.every_tokens if self.every_tokens
               else (self.clock() - self._since) * self.budget >= self.last_cost)
        if not due:
            return
        t0 = self.clock()
        self.save(conversation)
        self.last_cost = self.clock() - t0
        self.save_seconds += self.last_cost
        self.saves += 1
        self.intervals.append(position - self._tokens_at_last)
        self._tokens_at_last = position
        self._since = self.clock()
