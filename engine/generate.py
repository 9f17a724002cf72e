"""Generation as a plain loop: prefill in chunks (with progress), then decode one token at a time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from salachat.engine.cache import KVCache, ModelCache
from salachat.engine.tokenizer import StreamDecoder, Tokenizer

# progress(done_tokens, total_tokens, elapsed_seconds)
Progress = Callable[[int, int, float], None]


class Cancelled(Exception):
    """Raised inside prefill when the caller's cancel check says stop; the cache holds what was read."""


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int | None = None
    # llama.cpp's: logits of the tokens among the answer's last `repeat_last_n` divided by it (multiplied when
    # negative); 1.1 stops the default model's greedy loops ("The answer is no." again and again), see
    # docs/architecture.md, Long context for RoPE models
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64  # 0: off, -1: the whole answer
    min_p: float = 0.05  # keep tokens with probability >= min_p * the top token's (llama.cpp's default)


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    first_token_seconds: float = 0.0
    stopped_by: str = ""  # "stop_token" | "max_tokens" | "cancelled"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_seconds": round(self.prefill_seconds, 4),
            "decode_seconds": round(self.decode_seconds, 4),
            "time_to_first_token_seconds": round(self.first_token_seconds, 4),
            "prefill_tokens_per_second": round(self.prompt_tokens / self.prefill_seconds, 2)
            if self.prefill_seconds
            else None,
            "decode_tokens_per_second": round(self.generated_tokens / self.decode_seconds, 2)
            if self.decode_seconds
            else None,
            "stopped_by": self.stopped_by,
        }


ANSWER_ROOM = 1024  # positions a dense cache is given past a reading when it has to grow for it


def prefill(
    model,
    ids: list[int] | torch.Tensor,
    cache: ModelCache,
    chunk_size: int = 512,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_chunk: Callable[[ModelCache], None] | None = None,
) -> torch.Tensor:
    """Feed ids through the model in chunks; return the logits of the last token.

    Between chunks the cache is consistent, so a cancel (should_stop) leaves a usable, resumable cache and
    `on_chunk` may checkpoint it.
    """
    device = next(model.parameters()).device
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    total, start = ids.shape[0], time.perf_counter()
    if total == 0:
        raise ValueError("nothing to read: the prompt is empty")
    logits = None
    # the whole reading's room at once, and a question's and answer's past it: a cache that grows later is
    # copied, the old and the new at once (the default model's 8K reading peaked 167 MiB higher at its
    # first answer token)
    KVCache.reserve_together(cache.layers, cache.position + total, ahead=ANSWER_ROOM)
    for layer in cache.layers:  # other caches that can take it
        if hasattr(layer, "reserve") and type(layer) is not KVCache:
            layer.reserve(layer.length + total)
    for begin in range(0, total, chunk_size):
        if should_stop is not None and should_stop():
            raise Cancelled(f"stopped after {begin} of {total} tokens")
        logits = model(ids[begin : begin + chunk_size], cache, last_only=True)[-1]  # no LM head for the rest
        if on_chunk is not None:
            on_chunk(cache)
        if progress is not None:
            progress(min(begin + chunk_size, total), total, time.perf_counter() - start)
    return logits


def penalise_repeats(logits: torch.Tensor, recent: list[int], penalty: float) -> torch.Tensor:
    """llama.cpp's repetition penalty: each distinct token of `recent` has a positive logit divided by
    `penalty` and a negative one multiplied by it (so it always becomes less likely)."""
    if penalty == 1.0 or not recent:
        return logits
    ids = torch.tensor(sorted(set(recent)), dtype=torch.long, device=logits.device)
    seen = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None,
           recent: list[int] | None = None) -> int:
    """The next token. `recent`: the answer's tokens so far (the last `repeat_last_n` are penalised).

    Order as llama.cpp's: repetition penalty, then (unless greedy) temperature, top-p and min-p."""
    logits = logits.float()
    if recent and sampling.repeat_last_n != 0:
        window = recent if sampling.repeat_last_n < 0 else recent[-sampling.repeat_last_n :]
        logits = penalise_repeats(logits, window, sampling.repeat_penalty)
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.min_p > 0:
        probs = torch.where(probs >= sampling.min_p * probs.max(), probs, 0.0)
    if sampling.top_p < 1.0:
        sorted_probs, order = (probs / probs.sum()).sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        keep = sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def generate(
    model,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    cache: ModelCache,
    sampling: Sampling | None = None,
    *,
    chunk_size: int = 512,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    stats: Stats | None = None,
) -> Iterator[str]:
    """Stream the answer's text pieces. Prefill the prompt (appended to whatever the cache holds), then decode.

    The stop token is fed back into the cache, so the cache ends where the transcript ends and the next
    turn can continue from it.
    """
    stats = stats if stats is not None else Stats()
    sampling = sampling if sampling is not None else Sampling()
    stats.prompt_tokens = len(prompt_ids)
    device = next(model.parameters()).device
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
    t0 = time.perf_counter()
    logits = prefill(model, prompt_ids, cache, chunk_size, progress, should_stop)
    stats.prefill_seconds = time.perf_counter() - t0
    decoder = StreamDecoder(tokenizer)
    t1 = time.perf_counter()
    stats.stopped_by = "max_tokens"
    answer: list[int] = []
    for step in range(sampling.max_tokens):
        token = sample(logits.cpu(), sampling, generator, answer)
        answer.append(token)
        if step == 0:
            stats.first_token_seconds = time.perf_counter() - t0
        logits = model(torch.tensor([token], device=device), cache)[-1]
        stats.generated_tokens += 1
        if token in tokenizer.stop_ids:
            stats.stopped_by = "stop_token"
            stats.extra["stop_id"] = token
            break
        piece = decoder.push(token)
        if piece:
            yield piece
        if should_stop is not None and should_stop():
            stats.stopped_by = "cancelled"
            break
    stats.decode_seconds = time.perf_counter() - t1
