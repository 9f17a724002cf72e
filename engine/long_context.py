"""Reading past a dense RoPE model's trained length without training (InfLLM-style positions).

No query-key distance the model attends over exceeds what it was trained on:
- queries before `dense_len` (the trained length) attend every key at its true position: the dense model,
  bit for bit;
- past it, queries go in groups of `block_size` positions (aligned, like the key blocks). Group g starting
  at position g0 attends its local span [g0 - window, p] at true relative distances (at most window +
  block_size - 1), plus the initial block and `topk` selected blocks from before the span, all placed
  `memory_distance` = window + block_size away: memory keys are kept unrotated (position 0) and the query
  is rotated by that distance;
- blocks are scored in that same frame: the group's mean query (per head, rotated by the memory
  distance) against every unrotated key of each candidate block; a block scores by the attention mass it
  would get (log-sum-exp over its keys) from the head of its KV group that wants it most;
- while a question is answered, its words choose the memory instead (`focus_on`, engine/focus.py): the
  blocks of the span of the document that shares most terms with it, and `focus_topk` selected blocks.

docs/architecture.md ("Long context for RoPE models") gives the measurements behind the numbers.
`params_for(model)` returns the object `LoadedModel.sparse` holds; `model.new_cache(sparse=…)` builds one
`LongContextCache` per layer from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
from salachat.engine.cache import grow_tokens, register_cache
from salachat.kernels import dense_attention, rope
from salachat.kernels.long_context import (
    add_memory_blocks,
    extended_attention,
    rope_rows,
    select_memory_ref,
)


@dataclass(frozen=True)
class LongContextParams:
    block_size: int = 128
    window: int = 4096  # local span before a query group, at true distances
    init_blocks: int = 1  # the first tokens (system prompt, BOS): always attended, in the memory frame
    topk: int = 16  # selected memory blocks per query group and KV head
    dense_len: int = 8192  # queries before this position attend densely (the trained length)
    focus_spans: int = 1  # spans of the document a question's words point at (engine/focus.py): their blocks are
    # attended while answering it
    focus_topk: int = 0  # blocks selected by attention beside them while a question has a focus

    def __post_init__(self):
        b = self.block_size
        if self.window % b or self.window < b or b % 16:
            raise ValueError(f"long-context params: window {self.window} must be a multiple of block "
                             f"{b}, and block a multiple of 16")

    @property
    def memory_distance(self) -> int:
        return self.window + self.block_size

    @property
    def longest_distance(self) -> int:
        """The farthest query-key distance past dense_len: the memory distance."""
        return self.memory_distance

    def layer_cache(self, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device) -> LongContextCache:
        return LongContextCache(n_kv_heads, head_dim, self, dtype, device)


def params_for(model) -> LongContextParams:
    """Settings for a dense Llama-family model: a 4K window (half the trained length for shorter models),
    everything inside the trained length dense."""
    trained = int(model.args.max_position_embeddings)
    block = 128 if trained >= 2048 else 32
    window = max(block, min(4096, trained // 2) // block * block)
    return LongContextParams(block_size=block, window=window, dense_len=trained)


def trained_length(loaded) -> int | None:
    """The context a dense model was trained on; None where the model reads any length (MiniCPM-SALA)."""
    if loaded.family != "llama":
        return None
    return int(loaded.model.args.max_position_embeddings)


def focus_on(cache, document_ids, question_ids, tokenizer) -> list[int]:
    """Point the extension's layers of `cache` at the document blocks the question's words are about, for
    the question and its answer (every token from the cache's position on); returns those blocks."""
    from salachat.engine.focus import rank_blocks, term_ids

    layers = [layer for layer in cache.layers if isinstance(layer, LongContextCache)]
    if not layers:
        return []
    p = layers[0].params
    blocks = rank_blocks(document_ids, question_ids, term_ids(tokenizer), p.block_size, p.focus_spans,
                         p.init_blocks)
    for layer in layers:  # on the cache's device once, not copied there by every decode step of every layer
        layer.focus = torch.tensor(blocks, dtype=torch.int32, device=layer.keys.device) if blocks else None
        layer.focus_from = cache.position
    return blocks


def enable(loaded) -> None:
    """Turn the extension on for a loaded Llama-family model (new caches use it)."""
    loaded.sparse = params_for(loaded.model)


@register_cache
class LongContextCache:
    """One attention layer's cache for the extension: every token's unrotated K and V, and the rotated keys
    of the dense part (positions before dense_len)."""

    kind: ClassVar[str] = "long_context_kv"
    places_positions: ClassVar[bool] = True

    def __init__(self, n_kv_heads: int, head_dim: int, params: LongContextParams, dtype: torch.dtype, device):
        self.params = params
        empty = torch.empty(n_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.keys, self.values, self.rotated = empty, empty.clone(), empty.clone()
        self._length = 0
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None
        # the blocks the current question is about (engine/focus.py), attended by every query from
        # focus_from on; not saved: the keys and values they shaped are, and each question sets its own
        self.focus: torch.Tensor | None = None
        self.focus_from = 0

    @property
    def length(self) -> int:
        return self._length

    def _append(self, k: torch.Tensor, v: torch.Tensor, rotated: torch.Tensor | None) -> None:
        p = self.params
        start, need = self._length, self._length + k.shape[1]
        step = p.block_size * 16
        self.keys, self.values = grow_tokens(self.keys, need, step), grow_tokens(self.values, need, step)
        self.keys[:, start:need] = k
        self.values[:, start:need] = v
        if rotated is not None and rotated.shape[1]:
            n = rotated.shape[1]
            self.rotated = grow_tokens(self.rotated, start + n, step)
            self.rotated[:, start : start + n] = rotated
        self._length = need

    def _rotary_tables(self, rotary, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tables is None or self._tables[0].device != device:
            positions = torch.arange(self.params.memory_distance + 1, device=device)
            self._tables = rotary.cos_sin(positions)
        return self._tables

    def attend_unrotated(self, q, k, v, pos0: int, scale: float, rotary) -> torch.Tensor:
        """Append k, v [Hkv, T, D] (unrotated); attention of q [H, T, D] at positions pos0.. as above."""
        p = self.params
        t = q.shape[1]
        if pos0 != self._length:
            raise ValueError(f"long-context cache holds {self._length} positions, the model is at {pos0}")
        n_dense = min(max(p.dense_len - pos0, 0), t)
        cos = sin = None
        rotated = None
        if n_dense:
            cos, sin = rotary.cos_sin(torch.arange(pos0, pos0 + n_dense, device=q.device))
            rotated = rope(k[:, :n_dense], cos, sin)
        self._append(k, v, rotated)
        parts = []
        if n_dense:
            end = pos0 + n_dense
            q_rot = rope(q[:, :n_dense], cos, sin)
            parts.append(dense_attention(q_rot, self.rotated[:, :end], self.values[:, :end], pos0, scale))
        if n_dense < t:
            parts.append(self._extended(q[:, n_dense:], pos0 + n_dense, scale, rotary))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _extended(self, q: torch.Tensor, start: int, scale: float, rotary) -> torch.Tensor:
        p = self.params
        heads, t, d = q.shape
        hkv = self.keys.shape[0]
        dev = q.device
        cos_tab, sin_tab = self._rotary_tables(rotary, dev)
        positions = torch.arange(start, start + t, device=dev)
        first_group = start // p.block_size
        row_group = positions // p.block_size - first_group
        n_groups = int(row_group[-1]) + 1
        group_first = (first_group + torch.arange(n_groups, device=dev)) * p.block_size
        group_start = (group_first - p.window).clamp(min=0)
        rel = positions - group_start[row_group]
        q_loc = rope_rows(q, cos_tab[rel], sin_tab[rel])
        q_mem = rope_rows(q, cos_tab[p.memory_distance][None], sin_tab[p.memory_distance][None])
        # each group's mean memory-frame query over its rows, per head: [Hkv, G, heads per KV head, D]
        sums = torch.zeros(heads, n_groups, d, dtype=torch.float32, device=dev)
        sums.index_add_(1, row_group, q_mem.float())
        counts = torch.bincount(row_group, minlength=n_groups).clamp(min=1)
        qbar = (sums / counts[None, :, None]).view(hkv, heads // hkv, n_groups, d).transpose(1, 2)
        n_before = group_start // p.block_size
        n_blocks = int(n_before[-1])  # blocks any group of this call may take as memory
        focused = self.focus is not None and start >= self.focus_from
        memory = select_memory_ref(qbar, self.keys[:, : n_blocks * p.block_size], n_before, p.init_blocks,
                                   p.focus_topk if focused else p.topk, p.block_size, scale)
        if focused:
            memory = add_memory_blocks(memory, self.focus.to(dev), n_before)
        end = start + t
        return extended_attention(q_loc, q_mem, self.keys[:, :end], self.values[:, :end], memory, row_group,
                                  group_start, start, cos_tab, sin_tab, p.block_size, scale)

    def state(self) -> dict[str, torch.Tensor]:
        n_rot = min(self._length, self.params.dense_len)
        return {"keys": self.keys[:, : self._length], "values": self.values[:, : self._length],
                "rotated": self.rotated[:, :n_rot]}

    def meta(self) -> dict:
        return {"length": self._length, **asdict(self.params)}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> LongContextCache:
        # sessions saved before a field existed get its default
        params = LongContextParams(**{f.name: int(meta[f.name]) for f in fields(LongContextParams) if f.name in meta})
        keys, values, rotated = tensors["keys"], tensors["values"], tensors["rotated"]
        length = int(meta["length"])
        if keys.shape != values.shape or keys.dim() != 3 or keys.shape[1] != length:
            raise ValueError(f"long-context cache tensors {tuple(keys.shape)}/{tuple(values.shape)} "
                             f"do not match length {length}")
        if rotated.shape[1] != min(length, params.dense_len) or rotated.shape[0::2] != keys.shape[0::2]:
            raise ValueError(f"long-context cache: rotated keys {tuple(rotated.shape)} for length {length}")
        cache = cls(keys.shape[0], keys.shape[2], params, keys.dtype, keys.device)
        cache._append(keys, values, rotated)
        return cache
