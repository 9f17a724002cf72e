"""Which bytes of the engine state a save must write: only what changed since the last save.

KV caches are append-only along their position axis, so a tensor that grew there since the last save gets
only its new tail written, as one more segment; on load the segments are concatenated. Everything else
(Lightning's fixed-size recurrent states, compressed-key tails that are cheap) is small and rewritten whole.
A hash of the last saved position is kept, so a tensor that did not really just grow (a rebuilt cache)
is detected and rewritten whole instead of being silently spliced.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from salachat.sessions.safetensors_io import DTYPES, FROM_NAME

# Cache kinds (engine.cache registry names) whose tensors only ever grow, and along which axis.
APPEND_ONLY_AXIS: dict[str, int] = {"kv": 1, "sparse_kv": 1, "long_context_kv": 1}


def _edge_hash(tensor: torch.Tensor, dim: int, length: int) -> str:
    """Hash of position `length - 1` along `dim`: cheap evidence that the saved prefix is still there."""
    if length == 0:
        return ""
    edge = tensor.narrow(dim, length - 1, 1).detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.blake2b(edge.numpy().tobytes(), digest_size=16).hexdigest()


@dataclass
class SavePlan:
    entries: dict  # name -> manifest entry after this save
    grown: dict[str, torch.Tensor] = field(default_factory=dict)  # append-only tails and first writes
    rewritten: dict[str, torch.Tensor] = field(default_factory=dict)  # small tensors written whole


def append_axes(layer_meta: list[dict]) -> dict[str, int]:
    """layer index prefix -> append axis, from ModelCache meta."""
    return {f"layers.{i}.": APPEND_ONLY_AXIS[m["kind"]] for i, m in enumerate(layer_meta)
            if m["kind"] in APPEND_ONLY_AXIS}


def plan_save(previous: dict, tensors: dict[str, torch.Tensor], axes: dict[str, int],
              grown_file: str, rewritten_file: str) -> SavePlan:
    plan = SavePlan(entries={})
    for name, tensor in tensors.items():
        axis = next((a for prefix, a in axes.items() if name.startswith(prefix)), None)
        prev = previous.get(name)
        shape = list(tensor.shape)
        entry = {"dtype": DTYPES[tensor.dtype], "shape": shape, "axis": axis}
        if axis is not None:
            length = shape[axis]
            entry["edge"] = _edge_hash(tensor, axis, length)
            if _extends(prev, entry, tensor, axis):
                old = prev["shape"][axis]
                entry["segments"] = list(prev["segments"])
                if length > old:
                    plan.grown[name] = tensor.narrow(axis, old, length - old)
                    entry["segments"].append({"file": grown_file, "length": length - old})
            else:
                plan.grown[name] = tensor
                entry["segments"] = [{"file": grown_file, "length": length}]
        else:
            plan.rewritten[name] = tensor
            entry["segments"] = [{"file": rewritten_file, "length": None}]
        plan.entries[name] = entry
    return plan


def _extends(prev: dict | None, entry: dict, tensor: torch.Tensor, axis: int) -> bool:
    if prev is None or prev.get("axis") != axis or prev["dtype"] != entry["dtype"]:
        return False
    old, new = prev["shape"], entry["shape"]
    if len(old) != len(new) or any(a != b for i, (a, b) in enumerate(zip(old, new)) if i != axis):
        return False
    return 0 < old[axis] <= new[axis] and _edge_hash(tensor, axis, old[axis]) == prev["edge"]


def assemble(name: str, entry: dict, files: dict[str, dict[str, torch.Tensor]],
             device: torch.device | str) -> torch.Tensor:
    """The whole tensor on `device`, from its segments (each a lazily mapped view of a file)."""
    parts = [files[seg["file"]][name] for seg in entry["segments"]]
    shape, dtype = entry["shape"], FROM_NAME[entry["dtype"]]
    for part in parts:
        if part.dtype != dtype:
            raise ValueError(f"{name}: segment has dtype {part.dtype}, manifest says {dtype}")
    if len(parts) == 1:
        whole = parts[0]
        if list(whole.shape) != shape:
            raise ValueError(f"{name}: file holds shape {tuple(whole.shape)}, manifest says {tuple(shape)}")
        return whole.to(device)
    axis = entry["axis"]
    out = torch.empty(shape, dtype=dtype, device=device)
    begin = 0
    for part, seg in zip(parts, entry["segments"]):
        if part.shape[axis] != seg["length"]:
            raise ValueError(f"{name}: segment of {part.shape[axis]} positions, manifest says {seg['length']}")
        out.narrow(axis, begin, seg["length"]).copy_(part)  # one segment at a time: no second full copy in RAM
        begin += seg["length"]
    if begin != shape[axis]:
        raise ValueError(f"{name}: segments cover {begin} of {shape[axis]} positions")
    return out
