"""Save a conversation (engine state + what it has read and said) into a session folder, and load it back.

The interface with whoever holds the conversation is `ConversationState`, below, and nothing else:
    saving    SessionWriter(folder, documents).save(conversation): `conversation.session_state()` if it has
              one, else the same fields read off it by name (salachat.conversation.Conversation today:
              system_prompt, documents_text, reading text, fed_text, pending_ids, turns, chunk_size,
              document_tokens, cache, loaded).
    loading   load_session(folder, loaded) -> ResumedSession (a ConversationState, the manifest, the saved
              model's mode); load_conversation(folder, loaded) -> (Conversation, manifest) builds the
              product's Conversation from it (through `Conversation.from_session_state(state)` when that exists).
The model's mode is recorded as fields (manifest["model"]["quant"] and ["long_context"], ResumedSession.model),
so the product re-opens the model in the same mode without parsing the fingerprint.

Folder layout, one per session under salachat.paths.sessions_dir(), every file 0600 and the folders 0700:
    manifest.json            the commit point (see manifest.py)
    text-<sha>.json          system prompt, documents text, reading text: written once
    kv-<n>.safetensors       append-only KV tensors: the first save whole, later saves only their new tails
    state-<n>.safetensors    small tensors rewritten at every save (Lightning recurrent states)
    lock                     held (flock) by the process that has the session open for writing
Files no manifest names (left by an interrupted save, or superseded) are deleted when a session is opened
for writing and after each save.

A load is lazy where it can be (lazy.py): the sparse layers' K/V stream in from the files in the background
while the model starts answering, each layer waiting for its own K/V (and its checksums) on first use.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from salachat.engine.cache import CACHE_KINDS, ModelCache
from salachat.sessions.atomic import FILE_MODE, TMP_SUFFIX, private_dir, tree_of, write_atomic
from salachat.sessions.catalog import (
    LOCK,
    session_folder,  # noqa: F401  (re-exported)
)
from salachat.sessions.catalog import lock as _lock
from salachat.sessions.catalog import unlock as _unlock
from salachat.sessions.manifest import (
    FORMAT,
    MANIFEST,
    VERSION,
    SessionError,
    SessionSaveError,
    damaged,
    read_manifest,
    session_file,
    unreadable,
    verify_files,
    write_manifest,
)
from salachat.sessions.safetensors_io import DTYPES, load_tensors_mmap, save_tensors
from salachat.sessions.tensor_log import append_axes, assemble, plan_save

__all__ = ["ConversationState", "ResumedSession", "SavedModel", "SavedTurn", "SessionSaveError", "SessionWriter",
           "load_conversation", "load_session", "saved_model"]


@dataclass
class SavedTurn:
    question: str
    answer: str
    stats: dict = field(default_factory=dict)
    quoted: str = ""


@dataclass
class ConversationState:
    """Everything the store saves of a conversation and gives back on load."""

    loaded: Any  # engine.loader.LoadedModel: model_id, fingerprint, family, dtype, quant, long_context, device
    cache: ModelCache
    system_prompt: str
    documents_text: str  # rendered documents, placed before the first question
    reading_text: str  # the reading as queued (system prompt + documents, up to the question); "" if none
    fed_text: str  # everything the cache has seen, as text
    pending_ids: list[int]  # the reading's tokens not yet in the cache
    turns: list  # SavedTurn, or anything with question, answer and stats
    chunk_size: int
    document_tokens: int


@dataclass(frozen=True)
class SavedModel:
    """The model a session was read with, as the manifest records it (defaults filled in for older ones)."""

    id: str
    fingerprint: str
    family: str
    dtype: str  # "float32" | "bfloat16" | "float16"
    quant: str | None  # None | "int8" | "nf4"
    long_context: str  # "dense" | "extended" | "native"


def saved_model(manifest: dict) -> SavedModel:
    """The model of a manifest from read_manifest (which validated it and filled in older ones' defaults)."""
    m = manifest["model"]
    return SavedModel(m["id"], m["fingerprint"], m["family"], m["dtype"], m["quant"], m["long_context"])


@dataclass
class ResumedSession:
    state: ConversationState
    manifest: dict
    model: SavedModel
    stream: Any = None  # lazy.LazyFill while the sparse layers' K/V are still arriving (wait() to finish)


def state_of(conversation) -> ConversationState:
    """The ConversationState of a conversation: its own `session_state()`, or its fields read by name."""
    if hasattr(conversation, "session_state"):
        return conversation.session_state()
    reading_text = getattr(conversation, "reading_text", None)
    if reading_text is None:
        reading_text = getattr(conversation, "_reading_text", "")  # salachat.conversation before it said so
    return ConversationState(
        loaded=conversation.loaded, cache=conversation.cache, system_prompt=conversation.system_prompt,
        documents_text=conversation.documents_text, reading_text=reading_text, fed_text=conversation.fed_text,
        pending_ids=conversation.pending_ids, turns=conversation.turns, chunk_size=conversation.chunk_size,
        document_tokens=conversation.document_tokens)


def _ids_hash(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


class SessionWriter:
    """Saves one conversation into one folder, incrementally; `save` is safe to call at any moment."""

    def __init__(self, folder: Path, documents: list[dict] | None = None):
        self.folder = folder
        self.documents = documents
        self.manifest: dict | None = None
        self.last_save_seconds = 0.0
        self.last_save_bytes = 0
        try:
            if (folder / MANIFEST).exists():
                self.manifest = read_manifest(folder)
                self.documents = self.manifest["documents"] if documents is None else documents
            private_dir(folder.parent)
            private_dir(folder)
            self._lock = _lock(folder)
            self._remove_unreferenced()
            for path in folder.iterdir():  # sessions saved before files were private become private
                if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o077:
                    os.chmod(path, FILE_MODE)
        except OSError as e:
            raise SessionError(f"cannot open session {folder.name!r} for writing ({e.strerror or e}): check the "
                               f"permissions of {folder.parent}") from None

    def close(self) -> None:
        """Let other salachat processes open the session (the lock is per process: this closes it for every
        writer of this process on the folder). The OS does the same when the process ends."""
        _unlock(self.folder)

    def save(self, conversation) -> dict:
        """Write what changed since the last save; the manifest rename makes it the session's state."""
        try:
            return self._save(state_of(conversation))
        except OSError as e:
            try:
                self._remove_unreferenced()
            except OSError:
                pass
            kept = f"its last save ({self.manifest['tokens']:,} tokens) is kept" if self.manifest else "nothing was kept"
            raise SessionSaveError(f"could not save session {self.folder.name!r} ({e.strerror or e}); {kept}: "
                                   f"free space in {self.folder.parent} and run the command again") from None

    def _save(self, state: ConversationState) -> dict:
        t0 = time.perf_counter()
        loaded = state.loaded
        previous = self.manifest or {}
        counter = previous.get("next_file", 0)
        grown_file, rewritten_file = f"kv-{counter:06d}.safetensors", f"state-{counter:06d}.safetensors"
        tensors, cache_meta = state.cache.state()
        plan = plan_save(previous.get("cache", {}).get("tensors", {}), tensors, append_axes(cache_meta["layers"]),
                         grown_file, rewritten_file)
        files = {name: info for name, info in previous.get("files", {}).items()}
        written = 0
        text_file, text_info = self._save_text(state, files)
        files[text_file] = text_info
        for filename, part in ((grown_file, plan.grown), (rewritten_file, plan.rewritten)):
            if part:
                pieces: list[bytes] = []
                sha, size = save_tensors(self.folder / filename, part, pieces=pieces)
                files[filename] = {"sha256": sha, "bytes": size}
                if len(pieces) > 1:  # one piece: the checksum is already all a lazy load needs
                    files[filename]["pieces"] = [p.hex() for p in pieces]
                written += size
        referenced = {text_file} | {s["file"] for e in plan.entries.values() for s in e["segments"]}
        files = {name: info for name, info in files.items() if name in referenced}
        reading_text = state.reading_text
        fed_from_reading = bool(reading_text) and state.fed_text.startswith(reading_text)
        body = {
            "format": FORMAT, "version": VERSION,
            "created": previous.get("created", _now()), "updated": _now(),
            "model": {"id": loaded.model_id, "fingerprint": loaded.fingerprint, "family": loaded.family,
                      "dtype": _dtype_name(loaded.dtype), "quant": getattr(loaded, "quant", None),
                      "long_context": getattr(loaded, "long_context", None) or _default_mode(loaded.family),
                      **({"packed": True} if getattr(loaded, "packed", False) else {})},
            "documents": self.documents or [],
            "tokens": state.cache.position,
            "document_tokens": state.document_tokens,
            "conversation": {
                "chunk_size": state.chunk_size,
                "text_file": text_file,
                "fed_text_after_reading": state.fed_text[len(reading_text):] if fed_from_reading else None,
                "fed_text": None if fed_from_reading else state.fed_text,
                "pending_tokens": len(state.pending_ids),
                "pending_sha256": _ids_hash(state.pending_ids),
                "turns": [{"question": t.question, "answer": t.answer, "stats": t.stats,
                           **({"quoted": t.quoted} if getattr(t, "quoted", "") else {})} for t in state.turns],
            },
            "cache": {"meta": cache_meta, "tensors": plan.entries},
            "files": files,
            "next_file": counter + 1,
        }
        write_manifest(self.folder, body)
        self.manifest = read_manifest(self.folder)
        self._remove_unreferenced()
        self.last_save_seconds = time.perf_counter() - t0
        self.last_save_bytes = written
        return self.manifest

    def _save_text(self, state: ConversationState, files: dict) -> tuple[str, dict]:
        text = json.dumps({"system_prompt": state.system_prompt, "documents_text": state.documents_text,
                           "reading_text": state.reading_text}, ensure_ascii=False).encode()
        name = f"text-{hashlib.sha256(text).hexdigest()[:16]}.json"
        if name in files and (self.folder / name).is_file():
            return name, files[name]
        sha, size = write_atomic(self.folder / name, [text])
        return name, {"sha256": sha, "bytes": size}

    def _remove_unreferenced(self) -> None:
        keep = {MANIFEST, LOCK} | set((self.manifest or {}).get("files", {}))
        for path in self.folder.iterdir():
            if path.name not in keep and (path.suffix in (".safetensors", ".json") or path.name.endswith(TMP_SUFFIX)):
                path.unlink(missing_ok=True)


def _default_mode(family: str) -> str:
    return "native" if family == "minicpm_sala" else "dense"


def check_model(manifest: dict, loaded, name: str) -> None:
    saved = saved_model(manifest)
    if saved.fingerprint != loaded.fingerprint:
        raise SessionError(f"session {name!r} was read by other weights ({saved.id}, fingerprint "
                           f"{saved.fingerprint[:12]}), not {loaded.model_id} ({loaded.fingerprint[:12]}): "
                           "resume with the model that read it, or read the documents again")
    if saved.dtype != _dtype_name(loaded.dtype):
        raise SessionError(f"session {name!r} holds a {saved.dtype} state and the model runs in "
                           f"{_dtype_name(loaded.dtype)}: resume on the device it was read on")
    quant = getattr(loaded, "quant", None)
    if saved.quant != quant:
        raise SessionError(f"session {name!r} was read with quantisation {saved.quant or 'none'}, the model is "
                           f"loaded with {quant or 'none'}: resume with the same --quant")
    mode = getattr(loaded, "long_context", None) or _default_mode(loaded.family)
    if saved.long_context != mode:
        raise SessionError(f"session {name!r} was read in long-context mode {saved.long_context!r}, the model is "
                           f"loaded in {mode!r}: resume in the same mode")


def _check_layout(manifest: dict, fresh: ModelCache, name: str) -> None:
    saved = [layer["kind"] for layer in manifest["cache"]["meta"]["layers"]]
    unknown = sorted(set(saved) - set(CACHE_KINDS))
    if unknown:
        raise SessionError(f"session {name!r} holds caches of a kind this salachat does not know ({unknown[0]}): "
                           "use the salachat that saved it, or read the documents again")
    if saved != [layer.kind for layer in fresh.layers]:
        raise SessionError(f"session {name!r} has caches of another model's layout: read the documents again")
    # The geometry (block sizes, top-k, heads, head sizes) is the model's, not the file's to choose: a layer
    # meta or a tensor shape other than a new cache's is refused here, before any kernel sees it.
    meta, entries = manifest["cache"]["meta"], manifest["cache"]["tensors"]
    expected, _ = fresh.state()
    if set(entries) != set(expected):
        extra = min(set(entries) ^ set(expected))
        raise damaged(name, f"manifest: cache.tensors {'lacks' if extra in expected else 'has an unknown'} {extra}")
    for i, (saved_meta, layer) in enumerate(zip(meta["layers"], fresh.layers)):
        own = {k: v for k, v in layer.meta().items() if k != "length"}
        if {k: v for k, v in saved_meta.items() if k not in ("kind", "length")} != own:
            raise SessionError(f"session {name!r} was saved with other settings of layer {i} than this model's "
                               f"({own}): read the documents again")
        if saved_meta.get("length") != meta["position"]:
            raise damaged(name, f"manifest: layer {i} holds {saved_meta.get('length')} positions of {meta['position']}")
    for tensor, entry in entries.items():
        want, shape = expected[tensor], entry["shape"]
        axis = entry["axis"]
        # on the CPU a cache attends in whatever float dtype it holds: sessions saved with fp32 K/V (before
        # packed models kept theirs in 16 bits), or with bf16 K/V on a CPU that computes in bf16 and resumed on
        # one that keeps fp16, resume as they were saved
        kind = meta["layers"][int(tensor.split(".")[1])]["kind"]
        either = (want.device.type == "cpu" and kind in ("kv", "long_context_kv")
                  and {DTYPES[want.dtype], entry["dtype"]} <= {"F32", "BF16", "F16"})
        if (DTYPES[want.dtype] != entry["dtype"] and not either) or len(shape) != want.dim() or any(
                a != b for j, (a, b) in enumerate(zip(shape, want.shape)) if j != axis):
            raise damaged(name, f"manifest: {tensor} is {entry['dtype']} {shape}, this model's is "
                                f"{DTYPES[want.dtype]} {list(want.shape)}")


def _unusable(name: str, error: Exception) -> SessionError:
    if isinstance(error, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return SessionError(f"session {name!r} does not fit in the device's memory: resume with --kv-gpu-gb, "
                            "or on a larger device")
    return SessionError(f"session {name!r} holds an engine state this model cannot use ({error}): "
                        "read the documents again")


def load_cache(folder: Path, manifest: dict, device: torch.device | str, kv_gpu_gb: float | None = None,
               lazy: bool = False, verify: bool = True):
    """Rebuild the engine state layer by layer from memory-mapped files; tensors reach `device` one layer at
    a time, so host RAM never holds a full copy and the device holds one layer's temporaries at most.
    With `kv_gpu_gb` the sparse layers' K/V stays in host memory and only the budget's blocks go to the
    device, so a session larger than the GPU resumes. With `lazy`, the sparse layers' K/V is streamed in by
    a lazy.LazyFill (returned second; None when nothing is lazy) and checked by it when `verify`."""
    from salachat.engine.sparse_cache import SparseKVCache, limit_device_kv

    name = folder.name
    try:
        files = {f: load_tensors_mmap(session_file(folder, f)) for f in manifest["files"] if f.endswith(".safetensors")}
    except ValueError as e:
        raise damaged(name, str(e)) from None
    except OSError as e:
        raise unreadable(folder, e) from None
    entries, meta = manifest["cache"]["tensors"], manifest["cache"]["meta"]
    fill = None
    if lazy and kv_gpu_gb is None:
        from salachat.sessions.lazy import LazyFill

        fill = LazyFill(folder, manifest, torch.device(device), verify)
    layers = []
    try:
        for i, layer_meta in enumerate(meta["layers"]):
            kind = layer_meta["kind"]
            prefix = f"layers.{i}."
            offload = kv_gpu_gb is not None and CACHE_KINDS[kind] is SparseKVCache
            mine = {n[len(prefix):]: e for n, e in entries.items() if n.startswith(prefix)}
            if fill is not None and CACHE_KINDS[kind] is SparseKVCache and {"keys", "values"} <= set(mine):
                others = {n: e for n, e in mine.items() if n not in ("keys", "values")}
                small = {n: assemble(prefix + n, e, files, device) for n, e in others.items()}
                layers.append(fill.add_sparse_layer(i, layer_meta, small, mine["keys"], mine["values"], others))
                continue
            where = "cpu" if offload else device
            own = {n: assemble(prefix + n, e, files, where) for n, e in mine.items()}
            if offload:
                layers.append(SparseKVCache.from_state(own, layer_meta, resident_blocks=1, device=device))
            else:
                layers.append(CACHE_KINDS[kind].from_state(own, layer_meta))
            del own
        cache = ModelCache(layers=layers, position=int(meta["position"]))
        if kv_gpu_gb is not None:
            limit_device_kv(cache, kv_gpu_gb)
    except (ValueError, KeyError, RuntimeError, TypeError, IndexError, ArithmeticError) as e:
        if fill is not None:
            fill.cancel()
        raise _unusable(name, e) from None
    if fill is not None and not fill.layers:
        fill = None
    return cache, fill


def _read_text(folder: Path, manifest: dict) -> dict:
    saved = manifest["conversation"]
    path = session_file(folder, saved["text_file"])
    try:
        if path.stat().st_size != manifest["files"][saved["text_file"]]["bytes"]:
            raise damaged(folder.name, f"{saved['text_file']} has another size than saved (truncated?)")
        text = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise unreadable(folder, e) from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise damaged(folder.name, f"{saved['text_file']} is unreadable") from None
    if not isinstance(text, dict) or not all(isinstance(text.get(k), str) for k in
                                             ("system_prompt", "documents_text", "reading_text")):
        raise damaged(folder.name, f"{saved['text_file']} does not hold the conversation's text")
    return text


def load_session(folder: Path, loaded, verify: bool = True, lazy: bool = True) -> ResumedSession:
    """The conversation saved in `folder`, on `loaded`'s device, exactly as it was at its last save.

    Nothing is used before its checksum passes: the small files (text, Lightning states) are verified
    before this returns; with `lazy` the sparse layers' K/V are verified as they stream in, and a layer whose
    bytes fail raises SessionError at its first use, before any answer token. Without `lazy`, everything is
    loaded and verified before this returns."""
    from concurrent.futures import ThreadPoolExecutor

    manifest = read_manifest(folder)
    check_model(manifest, loaded, folder.name)
    _check_sizes(folder, manifest)
    fresh = loaded.new_cache()
    _check_layout(manifest, fresh, folder.name)
    del fresh
    kv_gpu_gb = getattr(loaded, "kv_gpu_gb", None)
    lazy_files = _lazy_files(manifest) if lazy and kv_gpu_gb is None else set()
    eager = None if not lazy_files else set(manifest["files"]) - lazy_files
    # checksums are verified while the state loads (hashing 8.6 GB takes as long as moving it to the GPU);
    # nothing is returned before they pass, and a damaged file is reported as such whatever else failed
    fill = None
    with ThreadPoolExecutor(max_workers=1) as background:
        checked = background.submit(verify_files, folder, manifest, eager) if verify else None
        try:
            text = _read_text(folder, manifest)
            cache, fill = load_cache(folder, manifest, loaded.device, kv_gpu_gb, lazy=bool(lazy_files),
                                     verify=verify)
        except Exception:
            if checked is not None:
                checked.result()  # raises the damage, which explains the failure
            raise
        if checked is not None:
            try:
                checked.result()
            except SessionError:
                if fill is not None:
                    fill.cancel()
                raise
    if fill is not None:
        fill.start()
    saved = manifest["conversation"]
    fed_text = saved["fed_text"] if saved["fed_text"] is not None else text["reading_text"] + saved["fed_text_after_reading"]
    pending: list[int] = []
    if saved["pending_tokens"]:
        # The queued reading is a suffix of the tokenised reading text: rebuild it rather than store it.
        ids = loaded.tokenizer.encode(text["reading_text"], add_bos=True)
        pending = ids[len(ids) - saved["pending_tokens"]:]
        if saved["pending_tokens"] > len(ids) or _ids_hash(pending) != saved["pending_sha256"]:
            if fill is not None:
                fill.cancel()
            raise SessionError(f"session {folder.name!r}: the unread part of the documents does not match "
                               "(another tokenizer?): read the documents again")
    state = ConversationState(
        loaded=loaded, cache=cache, system_prompt=text["system_prompt"], documents_text=text["documents_text"],
        reading_text=text["reading_text"], fed_text=fed_text, pending_ids=pending,
        turns=[SavedTurn(t["question"], t["answer"], t["stats"], t.get("quoted", "")) for t in saved["turns"]],
        chunk_size=saved["chunk_size"], document_tokens=manifest["document_tokens"])
    return ResumedSession(state, manifest, saved_model(manifest), fill)


def _check_sizes(folder: Path, manifest: dict) -> None:
    """Every file is there, a plain file of its saved size: the cheap checks first, with the clearest words."""
    for filename, info in sorted(manifest["files"].items()):
        try:
            size = session_file(folder, filename).stat().st_size
        except OSError as e:
            raise unreadable(folder, e) from None
        if size != info["bytes"]:
            raise damaged(folder.name, f"{filename} has {size} bytes, expected {info['bytes']} (truncated?)")


def _lazy_files(manifest: dict) -> set[str]:
    """Files that hold only sparse layers' tensors: a lazy load verifies those as it streams them. A file
    with a plain sha256 (saved before piece checksums) cannot be checked piece by piece as the stream reads
    it out of order, so it loads, and is verified, in full."""
    kinds = [layer["kind"] for layer in manifest["cache"]["meta"]["layers"]]
    holders: dict[str, set[str]] = {}
    for tensor, entry in manifest["cache"]["tensors"].items():
        kind = kinds[int(tensor.split(".")[1])]
        for seg in entry["segments"]:
            holders.setdefault(seg["file"], set()).add(kind)
    return {f for f, held in holders.items()
            if held == {"sparse_kv"} and tree_of(manifest["files"][f]["sha256"]) is not None}


def load_conversation(folder: Path, loaded, verify: bool = True, lazy: bool = True):
    """(Conversation, manifest): the salachat.conversation.Conversation saved in `folder` (see load_session)."""
    from salachat.conversation import Conversation, Turn

    resumed = load_session(folder, loaded, verify=verify, lazy=lazy)
    state = resumed.state
    if hasattr(Conversation, "from_session_state"):
        return Conversation.from_session_state(state), resumed.manifest
    conversation = Conversation(loaded, system_prompt=state.system_prompt, chunk_size=state.chunk_size)
    conversation.cache = state.cache
    conversation.documents_text = state.documents_text
    conversation._reading_text = state.reading_text
    conversation.document_tokens = state.document_tokens
    conversation.turns = [Turn(t.question, t.answer, t.stats, t.quoted) for t in state.turns]
    conversation.fed_text = state.fed_text
    conversation.pending_ids = state.pending_ids
    return conversation, resumed.manifest
