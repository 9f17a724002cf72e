"""CUDA graphs for one-token decode through runs of consecutive Lightning layers.

Decoding a token is ~100 small kernels per layer; launched one by one from Python they cost several times
the GPU time (measured: 48 ms per token of host time for 12.5 ms of GPU work on the 9B model, 1M context).
A Lightning layer's decode has fixed shapes (its state is fixed-size), so each run of consecutive Lightning
layers is captured once per cache as a graph and replayed; the sparse layers, whose KV grows and whose
selection changes every token, stay eager. A graph holds the addresses of the cache's state tensors, so it
is captured again when the cache (or a state tensor) changes. Python-side counters (a layer's length) are
not replayed: `run` advances them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    h: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    out: torch.Tensor
    state_ptrs: tuple[int, ...]


def enabled_for(model: torch.nn.Module) -> bool:
    """On unless SALACHAT_CUDA_GRAPHS=0; off for bitsandbytes layers, whose kernels are not known to capture."""
    if os.environ.get("SALACHAT_CUDA_GRAPHS", "1") == "0":
        return False
    return not any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())


class LightningGraphs:
    def __init__(self, layers: torch.nn.ModuleList):
        self.layers = layers
        self.cache_id: int | None = None
        self.captured: dict[int, _Captured] = {}
        self.warm: set[int] = set()
        self.pool = None

    def _forget(self, cache) -> None:
        # a fresh memory pool too: capturing into the pool of graphs that were just freed is not allowed
        self.captured.clear()
        self.cache_id, self.warm, self.pool = id(cache), set(), None

    def run(self, start: int, end: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor:
        """Layers start..end-1 (all Lightning) on one token; returns the hidden state after them."""
        if self.cache_id != id(cache):
            self._forget(cache)
        states = [cache.layers[i] for i in range(start, end)]
        ptrs = tuple(s.recurrent.data_ptr() for s in states)
        entry = self.captured.get(start)
        if entry is not None and entry.state_ptrs == ptrs:
            entry.h.copy_(h)
            entry.cos.copy_(cos)
            entry.sin.copy_(sin)
            entry.graph.replay()
            for s in states:
                s._length += 1
            return entry.out
        if start not in self.warm:  # the first step runs eagerly: compiles kernels, sets up cuBLAS
            self.warm.add(start)
            return self._layers(start, end, h, cos, sin, cache)
        static_h, static_cos, static_sin = h.clone(), cos.clone(), sin.clone()
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._layers(start, end, static_h, static_cos, static_sin, cache)  # advances the lengths once
        graph.replay()  # the capture recorded this step's work without running it
        self.captured[start] = _Captured(graph, static_h, static_cos, static_sin, out, ptrs)
        return out

    def _layers(self, start, end, h, cos, sin, cache):
        rope = {"lightning": (cos, sin)}
        for i in range(start, end):
            h = self.layers[i](h, rope, cache.layers[i], None)
        return h
