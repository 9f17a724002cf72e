"""Save a Conversation (engine state + what it has read and said) into a session folder, and load it back.

Folder layout, one per session under salachat.paths.sessions_dir():
    manifest.json            the commit point (see manifest.py)
    text-<sha>.json          system prompt, documents text, reading text: written once
    kv-<n>.safetensors       append-only KV tensors: the first save whole, later saves only their new tails
    state-<n>.safetensors    small tensors rewritten at every save (Lightning recurrent states)
Files no manifest names (left by an interrupted save, or superseded) are deleted when a session is opened
for writing and after each save.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from salachat.engine.cache import CACHE_KINDS, ModelCache
from salachat.sessions.atomic import TMP_SUFFIX, write_atomic
from salachat.sessions.catalog import (
    LOCK,
    session_folder,  # noqa: F401  (re-exported)
)
from salachat.sessions.catalog import lock as _lock
from salachat.sessions.manifest import (
    FORMAT,
    MANIFEST,
    VERSION,
    SessionError,
    read_manifest,
    verify_files,
    write_manifest,
)
from salachat.sessions.safetensors_io import load_tensors_mmap, save_tensors
from salachat.sessions.tensor_log import append_axes, assemble, plan_save


def _ids_hash(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")




class SessionSaveError(SessionError):
    """A save failed (full disk, permissions); the session still holds its previous save."""


class SessionWriter:
    """Saves one conversation into one folder, incrementally; `save` is safe to call at any moment."""

    def __init__(self, folder: Path, documents: list[dict] | None = None):
        self.folder = folder
        self.documents = documents
        self.manifest: dict | None = None
        self.last_save_seconds = 0.0
        self.last_save_bytes = 0
        if (folder / MANIFEST).exists():
            self.manifest = read_manifest(folder)
            self.documents = self.manifest["documents"] if documents is None else documents
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(folder)
        self._remove_unreferenced()

    def save(self, conversation) -> dict:
        """Write what changed since the last save; the manifest rename makes it the session's state."""
        try:
            return self._save(conversation)
        except OSError as e:
            self._remove_unreferenced()
            kept = f"its last save ({self.manifest['tokens']:,} tokens) is kept" if self.manifest else "nothing was kept"
            raise SessionSaveError(f"could not save session {self.folder.name!r} ({e.strerror or e}); {kept}: "
                                   f"free space in {self.folder.parent} and run the command again") from None

    def _save(self, conversation) -> dict:
        t0 = time.perf_counter()
        loaded = conversation.loaded
        previous = self.manifest or {}
        counter = previous.get("next_file", 0)
        grown_file, rewritten_file = f"kv-{counter:06d}.safetensors", f"state-{counter:06d}.safetensors"
        tensors, cache_meta = conversation.cache.state()
        plan = plan_save(previous.get("cache", {}).get("tensors", {}), tensors, append_axes(cache_meta["layers"]),
                         grown_file, rewritten_file)
        files = {name: info for name, info in previous.get("files", {}).items()}
        written = 0
        text_file, text_info = self._save_text(conversation, files)
        files[text_file] = text_info
        for filename, part in ((grown_file, plan.grown), (rewritten_file, plan.rewritten)):
            if part:
                sha, size = save_tensors(self.folder / filename, part)
                files[filename] = {"sha256": sha, "bytes": size}
                written += size
        referenced = {text_file} | {s["file"] for e in plan.entries.values() for s in e["segments"]}
        files = {name: info for name, info in files.items() if name in referenced}
        reading_text = getattr(conversation, "_reading_text", "")
        fed_from_reading = bool(reading_text) and conversation.fed_text.startswith(reading_text)
        body = {
            "format": FORMAT, "version": VERSION,
            "created": previous.get("created", _now()), "updated": _now(),
            "model": {"id": loaded.model_id, "fingerprint": loaded.fingerprint, "family": loaded.family,
                      "dtype": str(loaded.dtype).removeprefix("torch.")},
            "documents": self.documents or [],
            "tokens": conversation.cache.position,
            "document_tokens": conversation.document_tokens,
            "conversation": {
                "chunk_size": conversation.chunk_size,
                "text_file": text_file,
                "fed_text_after_reading": conversation.fed_text[len(reading_text):] if fed_from_reading else None,
                "fed_text": None if fed_from_reading else conversation.fed_text,
                "pending_tokens": len(conversation.pending_ids),
                "pending_sha256": _ids_hash(conversation.pending_ids),
                "turns": [{"question": t.question, "answer": t.answer, "stats": t.stats} for t in conversation.turns],
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

    def _save_text(self, conversation, files: dict) -> tuple[str, dict]:
        text = json.dumps({"system_prompt": conversation.system_prompt,
                           "documents_text": conversation.documents_text,
                           "reading_text": getattr(conversation, "_reading_text", "")}, ensure_ascii=False).encode()
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


def check_model(manifest: dict, loaded, name: str) -> None:
    saved = manifest["model"]
    if saved["fingerprint"] != loaded.fingerprint:
        raise SessionError(f"session {name!r} was read by other weights ({saved['id']}, fingerprint "
                           f"{saved['fingerprint'][:12]}), not {loaded.model_id} ({loaded.fingerprint[:12]}): "
                           "resume with the model that read it, or read the documents again")
    if saved["dtype"] != str(loaded.dtype).removeprefix("torch."):
        raise SessionError(f"session {name!r} holds a {saved['dtype']} state and the model runs in "
                           f"{str(loaded.dtype).removeprefix('torch.')}: resume on the device it was read on")


def load_cache(folder: Path, manifest: dict, device: torch.device | str, kv_gpu_gb: float | None = None) -> ModelCache:
    """Rebuild the engine state layer by layer from memory-mapped files; tensors reach `device` one layer at
    a time, so host RAM never holds a full copy and the device holds one layer's temporaries at most.
    With `kv_gpu_gb` the sparse layers' K/V stays in host memory and only the budget's blocks go to the
    device, so a session larger than the GPU resumes."""
    from salachat.engine.sparse_cache import SparseKVCache, limit_device_kv

    files = {name: load_tensors_mmap(folder / name) for name in manifest["files"] if name.endswith(".safetensors")}
    entries, meta = manifest["cache"]["tensors"], manifest["cache"]["meta"]
    layers = []
    try:
        for i, layer_meta in enumerate(meta["layers"]):
            kind = layer_meta["kind"]
            if kind not in CACHE_KINDS:
                raise ValueError(f"unknown cache kind {kind!r} for layer {i}")
            prefix = f"layers.{i}."
            offload = kv_gpu_gb is not None and CACHE_KINDS[kind] is SparseKVCache
            where = "cpu" if offload else device
            own = {n[len(prefix):]: assemble(n, e, files, where) for n, e in entries.items() if n.startswith(prefix)}
            if offload:
                layers.append(SparseKVCache.from_state(own, layer_meta, resident_blocks=1, device=device))
            else:
                layers.append(CACHE_KINDS[kind].from_state(own, layer_meta))
            del own
    except (ValueError, KeyError, RuntimeError) as e:
        raise SessionError(f"session {folder.name!r} holds an engine state this model cannot use ({e}): "
                           "read the documents again") from None
    cache = ModelCache(layers=layers, position=int(meta["position"]))
    if kv_gpu_gb is not None:
        limit_device_kv(cache, kv_gpu_gb)
    return cache


def load_conversation(folder: Path, loaded, verify: bool = True):
    """The Conversation saved in `folder`, on `loaded`'s device, exactly as it was at its last save."""
    from salachat.conversation import Conversation, Turn

    manifest = read_manifest(folder)
    check_model(manifest, loaded, folder.name)
    # checksums are verified while the state loads (hashing 8.6 GB takes as long as moving it to the GPU);
    # nothing is returned before they pass, and a damaged file is reported as such whatever else failed
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as background:
        checked = background.submit(verify_files, folder, manifest) if verify else None
        try:
            saved = manifest["conversation"]
            text = json.loads((folder / saved["text_file"]).read_text(encoding="utf-8"))
            conversation = Conversation(loaded, system_prompt=text["system_prompt"], chunk_size=saved["chunk_size"])
            fresh = conversation.cache
            conversation.cache = load_cache(folder, manifest, loaded.device, getattr(loaded, "kv_gpu_gb", None))
        except Exception:
            if checked is not None:
                checked.result()  # raises the damage, which explains the failure
            raise
        if checked is not None:
            checked.result()
    if [type(layer) for layer in fresh.layers] != [type(layer) for layer in conversation.cache.layers]:
        raise SessionError(f"session {folder.name!r} has caches of another model's layout: read the documents again")
    conversation.documents_text = text["documents_text"]
    conversation._reading_text = text["reading_text"]
    conversation.document_tokens = manifest["document_tokens"]
    conversation.turns = [Turn(t["question"], t["answer"], t["stats"]) for t in saved["turns"]]
    if saved["fed_text"] is not None:
        conversation.fed_text = saved["fed_text"]
    else:
        conversation.fed_text = text["reading_text"] + saved["fed_text_after_reading"]
    if saved["pending_tokens"]:
        # The queued reading is a suffix of the tokenised reading text: rebuild it rather than store it.
        ids = conversation.tokenizer.encode(text["reading_text"], add_bos=True)
        conversation.pending_ids = ids[len(ids) - saved["pending_tokens"]:]
        if _ids_hash(conversation.pending_ids) != saved["pending_sha256"]:
            raise SessionError(f"session {folder.name!r}: the unread part of the documents does not match "
                               "(another tokenizer?): read the documents again")
    return conversation, manifest
