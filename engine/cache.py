"""Per-layer caches as small explicit objects, and the container that holds one per layer.

Every cache kind owns its tensors and knows how to expose them for saving (`state`, `meta`) and how to be
rebuilt from them (`from_state`). A saved session is the sum of `state` over the layers, plus the
position; `CACHE_KINDS` is the explicit registry used to rebuild them (no lookups in module globals).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
from salachat.kernels import dense_attention


class LayerCache(Protocol):
    kind: ClassVar[str]

    @property
    def length(self) -> int: ...

    def state(self) -> dict[str, torch.Tensor]: ...

    def meta(self) -> dict[str, int | float | str]: ...

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> LayerCache: ...


def grow_tokens(buffer: torch.Tensor, need: int, step: int) -> torch.Tensor:
    """`buffer` [heads, capacity, dim] with room for `need` positions, in multiples of `step`, the valid
    prefix copied over."""
    if need <= buffer.shape[1]:
        return buffer
    target = max(need, buffer.shape[1] * 5 // 4)  # geometric: appending to 1M tokens copies O(L) bytes
    capacity = (target + step - 1) // step * step
    grown = buffer.new_empty(buffer.shape[0], capacity, buffer.shape[2])
    grown[:, : buffer.shape[1]] = buffer
    return grown


CACHE_KINDS: dict[str, type] = {}


def register_cache(cls: type) -> type:
    """Class decorator: make a cache kind loadable by its `kind` name."""
    if cls.kind in CACHE_KINDS and CACHE_KINDS[cls.kind] is not cls:
        raise ValueError(f"cache kind {cls.kind!r} registered twice")
    CACHE_KINDS[cls.kind] = cls
    return cls


@register_cache
class KVCache:
    """Dense key/value cache of one attention layer, grown in steps so appends are amortised O(1).

    Layout [n_kv_heads, capacity, head_dim]; only the first `length` positions are valid.
    """

    kind: ClassVar[str] = "kv"
    GROW = 1024  # at least this many positions at a time; geometric beyond, so a 1M context copies O(L) bytes

    def __init__(self, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str):
        self.keys = torch.empty(n_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    def reserve(self, total: int) -> None:
        """Room for `total` positions at once (a reading of known length): no regrowth while it is read, so
        the cache's peak memory is its size, not a grown copy beside the old buffer."""
        if total > self.keys.shape[1]:
            self._grow(((total + self.GROW - 1) // self.GROW) * self.GROW)

    @staticmethod
    def reserve_together(layers: list, total: int, ahead: int = 0) -> None:
        """`reserve(total)` for every KVCache among `layers`, those alike sharing one allocation: a heap of
        per-layer buffers between a prefill's transients is memory the allocator keeps after they are freed
        (a glibc process reading 8K tokens held 68 MB more than its cache and model); one block of the
        whole cache is mapped on its own and comes back whole. A cache that has to grow gets `ahead` more
        positions than `total` (room for what follows a reading: `generate.ANSWER_ROOM`)."""
        alike: dict[tuple, list[KVCache]] = {}
        for layer in layers:
            if type(layer) is KVCache and total > layer.keys.shape[1]:
                k = layer.keys
                alike.setdefault((k.shape[0], k.shape[2], k.dtype, k.device), []).append(layer)
        for (heads, dim, dtype, device), group in alike.items():
            capacity = ((total + ahead + KVCache.GROW - 1) // KVCache.GROW) * KVCache.GROW
            block = torch.empty(len(group), 2, heads, capacity, dim, dtype=dtype, device=device)
            for layer, buffers in zip(group, block):
                layer._grow(capacity, buffers[0], buffers[1])

    def _grow(self, capacity: int, grown_k: torch.Tensor | None = None, grown_v: torch.Tensor | None = None) -> None:
        if grown_k is None:
            grown_k = self.keys.new_empty(self.keys.shape[0], capacity, self.keys.shape[2])  # keeps its dtype
            grown_v = self.values.new_empty(self.values.shape[0], capacity, self.values.shape[2])
        grown_k[:, : self._length] = self.keys[:, : self._length]
        grown_v[:, : self._length] = self.values[:, : self._length]
        self.keys, self.values = grown_k, grown_v

    def make_room(self, t: int) -> None:
        """Capacity for `t` more positions (a kernel that writes them in place calls this, then `advance`)."""
        need = self._length + t
        if need > self.keys.shape[1]:
            target = max(need, self.keys.shape[1] * 5 // 4)
            self._grow(((target + self.GROW - 1) // self.GROW) * self.GROW)

    def advance(self, t: int) -> None:
        """`t` positions written in place past the valid prefix (within the room `make_room` made) are valid."""
        assert self._length + t <= self.keys.shape[1]
        self._length += t

    def update_and_fetch(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v of shape [n_kv_heads, T, head_dim]; return all keys and values so far."""
        t = k.shape[1]
        need = self._length + t
        self.make_room(t)
        self.keys[:, self._length : need] = k
        self.values[:, self._length : need] = v
        self._length = need
        return self.keys[:, :need], self.values[:, :need]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos0: int, scale: float) -> torch.Tensor:
        """Append k, v [n_kv, T, D]; causal GQA attention of q [n_heads, T, D] over everything cached."""
        keys, values = self.update_and_fetch(k, v)
        return dense_attention(q, keys, values, pos0, scale)

    def state(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys[:, : self._length], "values": self.values[:, : self._length]}

    def meta(self) -> dict:
        return {"length": self._length}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> KVCache:
        keys, values = tensors["keys"], tensors["values"]
        if keys.shape != values.shape or keys.dim() != 3:
            raise ValueError(f"kv cache tensors have shapes {tuple(keys.shape)} and {tuple(values.shape)}")
        if int(meta["length"]) != keys.shape[1]:
            raise ValueError(f"kv cache says length {meta['length']} but holds {keys.shape[1]} positions")
        cache = cls(keys.shape[0], keys.shape[2], keys.dtype, keys.device)
        cache.update_and_fetch(keys, values)
        return cache


@dataclass
class ModelCache:
    """One cache per layer plus the absolute position of the next token."""

    layers: list
    position: int = 0
    extra: dict = field(default_factory=dict)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Flatten to tensors named `layers.{i}.{name}` and JSON-able metadata."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict = {"position": self.position, "layers": []}
        for i, layer in enumerate(self.layers):
            for name, tensor in layer.state().items():
                tensors[f"layers.{i}.{name}"] = tensor
            meta["layers"].append({"kind": layer.kind, **layer.meta()})
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> ModelCache:
        layers = []
        for i, layer_meta in enumerate(meta["layers"]):
            kind = layer_meta["kind"]
            if kind not in CACHE_KINDS:
                raise ValueError(f"unknown cache kind {kind!r} for layer {i}")
            prefix = f"layers.{i}."
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            layers.append(CACHE_KINDS[kind].from_state(own, layer_meta))
        return cls(layers=layers, position=int(meta["position"]))

    def to(self, device: torch.device | str) -> ModelCache:
        tensors, meta = self.state()
        return ModelCache.from_state({k: v.to(device) for k, v in tensors.items()}, meta)
