"""CUDA graphs for one-token decode: everything but the sparse layers' caches.

Decoding a token is ~100 small kernels per layer; launched one by one from Python they cost several times
the GPU time (measured: 48 ms per token of host time for 12.5 ms of GPU work on the 9B model, 1M context).
Between two sparse layers' caches (whose KV grows and whose selection changes every token, so they stay
eager) every shape is fixed: the end of one sparse layer, the Lightning layers (fixed-size state) and the
start of the next. Each such segment is captured once per cache as a graph and replayed. A graph holds the
addresses of the cache's state tensors, so it is captured again when the cache (or a state tensor) changes.
Python-side counters (a layer's length) are not replayed: `run` advances them.

A graph reads its inputs from fixed buffers. Where an input is another graph's output (the residual stream
and the next sparse layer's normed input) or a table staged once a token (the RoPE tables, `stage`), the
graph is captured reading that buffer itself, so the token's ~60 device copies into the graphs' inputs
shrink to one a sparse layer (its attention's output) and the staged tables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list  # static input tensors (None where an input is absent)
    outputs: tuple
    state_ptrs: tuple[int, ...]


def enabled_for(model: torch.nn.Module) -> bool:
    """On unless SALACHAT_CUDA_GRAPHS=0; off for bitsandbytes layers, whose kernels are not known to capture."""
    if os.environ.get("SALACHAT_CUDA_GRAPHS", "1") == "0":
        return False
    return not any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())


class DecodeGraphs:
    """Graphs of the decode segments between the sparse layers' caches, per cache."""

    def __init__(self):
        self.cache_id: int | None = None
        self.captured: dict[int, _Captured] = {}
        self.warm: set[int] = set()
        self.pool = None
        self.staged: list[torch.Tensor] | None = None
        self.owned: set[tuple] = set()  # buffers that outlive a token: captured outputs, staged tables

    def _forget(self, cache) -> None:
        # a fresh memory pool too: capturing into the pool of graphs that were just freed is not allowed; the
        # freed outputs' addresses are no longer ours
        self.captured.clear()
        self.cache_id, self.warm, self.pool = id(cache), set(), None
        self.owned = {_where(t) for t in self.staged or []}

    def stage(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The same values in buffers that every token reuses (graphs read them in place)."""
        if self.staged is None or [t.shape for t in tensors] != [t.shape for t in self.staged]:
            self.staged = [t.clone() for t in tensors]
            self.cache_id = None  # graphs read the old buffers: capture again
            return self.staged
        for buffer, t in zip(self.staged, tensors):
            buffer.copy_(t)
        return self.staged

    def run(self, key: int, fn, inputs: list, states: list, cache) -> tuple:
        """fn(*inputs) for one token, replayed from a graph once captured. `states` are the Lightning states
        fn advances (their addresses are baked into the graph; their Python lengths are advanced here)."""
        if self.cache_id != id(cache):
            self._forget(cache)
        ptrs = tuple(s.recurrent.data_ptr() for s in states)
        entry = self.captured.get(key)
        if entry is not None and entry.state_ptrs != ptrs:
            # a state was replaced: this graph is captured again, and the graphs that read its old outputs
            # in place with it
            self._forget(cache)
            entry = None
        if entry is not None:
            for static, value in zip(entry.inputs, inputs):
                if static is not None and static is not value and _where(static) != _where(value):
                    static.copy_(value)
            entry.graph.replay()
            for s in states:
                s._length += 1
            return entry.outputs
        if key not in self.warm:  # the first step runs eagerly: compiles kernels, sets up cuBLAS
            self.warm.add(key)
            return fn(*inputs)
        static = [None if t is None else t if _where(t) in self.owned else t.clone() for t in inputs]
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = fn(*static)  # advances the lengths once
        graph.replay()  # the capture recorded this step's work without running it
        self.captured[key] = _Captured(graph, static, outputs, ptrs)
        self.owned.update(_where(t) for t in outputs if t is not None)
        return outputs


def _where(t: torch.Tensor) -> tuple:
    """A view's identity as a graph sees it: address, shape and strides."""
    return t.data_ptr(), tuple(t.shape), t.stride()
