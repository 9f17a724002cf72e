"""Lazy resume: answer before the sparse layers' K/V has arrived, never from bytes that were not verified.

A 1M-token MiniCPM-SALA session is ~9 GB, nearly all of it the sparse layers' keys and values; everything
else (Lightning states, compressed keys) is small. `load_session` loads the small part and returns; the
K/V then streams from the session files into each layer's device buffers in the background, in layer
order, on several threads (pread into pinned memory, the checksum of each 64 MiB piece, one copy up a piece
at a time). A sparse layer wears `_LazySparseKVCache` until then: its first use (the question's prefill
reaching that layer) waits for its own bytes to be in and their pieces to match the digests the manifest
lists, then it is a plain SparseKVCache again, so the answer is the one a full load gives, bit for bit.
A piece that fails its checksum or cannot be read makes the layer's first use raise SessionError (before
any answer token). The model computes the layers before the first sparse one, and each layer while the
next ones stream, so a resume costs about the stream of the state, not the stream plus the prefill.

Files whose manifest lists no per-piece digests (only a tree checksum) stream the same way; a layer then
waits for every piece of the files it reads (the file checksum is over all of them). A file with a plain
sha256 (older still) cannot be checked a piece at a time, so it is not streamed: it loads in full.
"""

from __future__ import annotations

import atexit
import bisect
import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from salachat.engine.sparse_cache import SparseKVCache
from salachat.sessions import atomic
from salachat.sessions.manifest import SessionError, damaged, session_file
from salachat.sessions.safetensors_io import FROM_NAME, read_header

_ACTIVE: weakref.WeakSet = weakref.WeakSet()  # fills still streaming: stopped cleanly when the process exits
CHUNK = 16 << 20  # bytes a worker reads, hashes and copies up at a time (a quarter of a piece)
SLACK_TOKENS = 16384  # room in the restored buffers for the next question before the first regrow


@dataclass(order=True)
class _Extent:
    """A contiguous run of file bytes that lands in a contiguous run of a device buffer."""

    start: int  # in the file
    end: int
    dest: torch.Tensor = field(compare=False)  # flat uint8 view of the destination run


@dataclass
class _Layer:
    units: set  # (file, piece) or (file, None): what must check out before this layer may be used
    event: threading.Event = field(default_factory=threading.Event)
    failure: str | None = None


class _LazySparseKVCache(SparseKVCache):
    """A restored sparse layer whose K/V is still streaming in: any use waits for it (or raises the reason it
    will not come), then the object is a plain SparseKVCache, with nothing left of this class."""

    def _filled(self) -> None:
        self._fill_wait()  # raises SessionError if its bytes failed: the object stays unusable
        del self._fill_wait
        self.__class__ = SparseKVCache


def _waiting(name: str):
    def method(self, *args, **kwargs):
        self._filled()
        return getattr(self, name)(*args, **kwargs)

    method.__name__ = name
    return method


for _name in ("attend", "append", "state", "set_resident_blocks", "_keys", "_attend_offloaded", "_fill"):
    setattr(_LazySparseKVCache, _name, _waiting(_name))


class LazyFill:
    """The background stream of one load; `add_sparse_layer` for each lazy layer, then `start`."""

    def __init__(self, folder: Path, manifest: dict, device: torch.device, verify: bool = True):
        self.folder, self.manifest, self.device, self.verify = folder, manifest, device, verify
        self.files = manifest["files"]
        self.headers: dict[str, tuple[int, dict]] = {}
        self.layers: dict[int, _Layer] = {}
        self.extents: dict[str, list[_Extent]] = {}
        self._lock = threading.Lock()
        self._tasks: list[tuple[int, str, int]] = []
        self._unit_layers: dict[tuple, list[int]] = {}
        self._whole: dict[str, dict[int, bytes]] = {}  # pieces hashed so far, for files without piece digests
        self._failure: str | None = None
        self._cancelled = False
        self._left = 0
        self._all_done = threading.Event()
        self._fds: dict[str, int] = {}
        self.seconds: float | None = None  # how long the stream took, once done

    def _header(self, file: str) -> tuple[int, dict]:
        if file not in self.headers:
            self.headers[file] = read_header(session_file(self.folder, file))
        return self.headers[file]

    def _units(self, file: str, start: int, end: int) -> set:
        if "pieces" in self.files[file]:
            first, last = start // atomic.PIECE, max(start, end - 1) // atomic.PIECE
            return {(file, p) for p in range(first, last + 1)} | {(file, 0)}  # piece 0: the header we parsed
        return {(file, None)}

    def add_sparse_layer(self, index: int, meta: dict, small: dict[str, torch.Tensor], keys_entry: dict,
                         values_entry: dict, small_entries: dict | None = None) -> SparseKVCache:
        """A SparseKVCache for layer `index` around empty device buffers that the stream fills; `small` are
        its other tensors (compressed keys), already on the device."""
        shape, dtype = keys_entry["shape"], FROM_NAME[keys_entry["dtype"]]
        length = int(meta["length"])
        if (len(shape) != 3 or values_entry["shape"] != shape or values_entry["dtype"] != keys_entry["dtype"]
                or shape[1] != length or keys_entry["axis"] != 1 or values_entry["axis"] != 1):
            raise ValueError(f"layer {index}: keys {shape} and values {values_entry['shape']} for length {length}")
        heads, _, dim = shape
        k1, k2 = small.get("k1"), small.get("k2")
        for name, kernel, compressed in (("k1", 1, k1), ("k2", 4, k2)):
            count = max(0, (length - kernel * int(meta["kernel_size"])) // (kernel * int(meta["kernel_stride"])) + 1)
            if compressed is None or compressed.dim() != 3 or compressed.dtype != dtype or \
                    tuple(compressed.shape) != (heads, count, dim):
                raise ValueError(f"layer {index}: saved {name} does not match {length} keys")
        step = int(meta["block_size"]) * 16
        capacity = -(-(length + SLACK_TOKENS) // step) * step
        keys = torch.empty(heads, capacity, dim, dtype=dtype, device=self.device)
        values = torch.empty_like(keys)
        cache = SparseKVCache.restored(meta, k1, k2, keys, values)
        units: set = set()
        itemsize = dtype.itemsize
        for tensor, entry, buffer in (("keys", keys_entry, keys), ("values", values_entry, values)):
            position = 0
            for seg in entry["segments"]:
                file, count = seg["file"], seg["length"]
                start, header = self._header(file)
                info = header.get(f"layers.{index}.{tensor}")
                if info is None or info["dtype"] != entry["dtype"] or info["shape"] != [heads, count, dim]:
                    raise ValueError(f"layer {index}: {file} does not hold its {tensor} as the manifest says")
                row = count * dim * itemsize
                begin = start + info["data_offsets"][0]
                for head in range(heads):
                    flat = buffer[head].view(-1).view(torch.uint8)
                    dest = flat[position * dim * itemsize : position * dim * itemsize + row]
                    self.extents.setdefault(file, []).append(_Extent(begin + head * row, begin + (head + 1) * row, dest))
                units |= self._units(file, begin, begin + heads * row)
                position += count
        for name, entry in (small_entries or {}).items():  # the compressed keys were read from these bytes
            for seg in entry["segments"]:
                start, header = self._header(seg["file"])
                begin, end = header[f"layers.{index}.{name}"]["data_offsets"]
                units |= self._units(seg["file"], start + begin, start + end)
        self.layers[index] = _Layer(units)
        cache.__class__ = _LazySparseKVCache
        cache._fill_wait = lambda: self.wait_layer(index)
        return cache

    def start(self) -> None:
        """Begin streaming: the pieces of the earliest layers first, on several threads."""
        import time

        self._t0 = time.perf_counter()
        for extents in self.extents.values():
            extents.sort()
        order: dict[tuple, int] = {}
        for index, layer in sorted(self.layers.items()):
            for unit in layer.units:
                self._unit_layers.setdefault(unit, []).append(index)
                order.setdefault(unit, index)
        for file in self.extents:
            size = self.files[file]["bytes"]
            for piece in range(max(1, -(-size // atomic.PIECE))):
                unit = (file, piece) if "pieces" in self.files[file] else (file, None)
                self._tasks.append((order.get(unit, len(self.layers) + 1), file, piece))
        self._tasks.sort(reverse=True)  # popped from the end: earliest layer first
        self._left = len(self._tasks)
        try:
            for file in self.extents:
                self._fds[file] = os.open(session_file(self.folder, file), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except (OSError, SessionError) as e:
            self._fail_all(f"{e.strerror if isinstance(e, OSError) else e}")
            return
        workers = max(1, min(12, (os.cpu_count() or 2) - 1, len(self._tasks)))
        self._threads = [threading.Thread(target=self._work, daemon=True, name="salachat-session-stream")
                         for _ in range(workers)]
        _ACTIVE.add(self)
        for thread in self._threads:
            thread.start()

    def _fail_all(self, problem: str) -> None:
        with self._lock:
            self._failure = self._failure or problem
            for layer in self.layers.values():
                layer.failure = layer.failure or problem
                layer.event.set()
            self._all_done.set()

    def _work(self) -> None:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        buffers = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=cuda) for _ in range(2 if cuda else 1)]
        events = [None] * len(buffers)
        turn = 0
        while True:
            with self._lock:
                if self._cancelled or not self._tasks:
                    return
                _, file, piece = self._tasks.pop()
            problem, digest = None, None
            try:
                digest, turn = self._piece(file, piece, buffers, events, stream, turn)
            except OSError as e:
                problem = f"{file} cannot be read: {e.strerror or e}"
            except Exception as e:  # noqa: BLE001 (any failure must reach the waiting layer, not die here)
                problem = f"{file}: {type(e).__name__}: {e}"
            self._done(file, piece, digest, problem)

    def _piece(self, file, piece, buffers, events, stream, turn):
        fd, extents = self._fds[file], self.extents[file]
        begin = piece * atomic.PIECE
        end = min(begin + atomic.PIECE, self.files[file]["bytes"])
        digest = (atomic.tree_of(self.files[file]["sha256"]) or atomic.SHA256_TREE).new()
        starts = [e.start for e in extents]
        for offset in range(begin, max(end, begin + 1), CHUNK):
            n = min(CHUNK, end - offset)
            slot = turn % len(buffers)
            turn += 1
            if events[slot] is not None:
                events[slot].synchronize()  # its previous copy up must be done before it is overwritten
            buffer = buffers[slot]
            view = memoryview(buffer.numpy())[:n]
            got = 0
            while got < n:
                read = os.preadv(fd, [view[got:]], offset + got)
                if read == 0:
                    raise OSError(0, f"ends {n - got} bytes early")
                got += read
            if self.verify:
                digest.update(view)
            first = max(0, bisect.bisect_right(starts, offset) - 1)
            for extent in extents[first:]:
                if extent.start >= offset + n:
                    break
                lo, hi = max(extent.start, offset), min(extent.end, offset + n)
                if lo >= hi:
                    continue
                target = extent.dest[lo - extent.start : hi - extent.start]
                if stream is not None:
                    with torch.cuda.stream(stream):
                        target.copy_(buffer[lo - offset : hi - offset], non_blocking=True)
                else:
                    target.copy_(buffer[lo - offset : hi - offset])
            if stream is not None:
                events[slot] = torch.cuda.Event()
                events[slot].record(stream)
        if stream is not None:
            stream.synchronize()  # the layer this piece gates may be used as soon as it is marked done
        return digest.digest(), turn

    def _done(self, file: str, piece: int, digest: bytes | None, problem: str | None) -> None:
        info = self.files[file]
        finished: list[tuple[tuple, str | None]] = []
        with self._lock:
            if "pieces" in info:
                if problem is None and self.verify and digest.hex() != info["pieces"][piece]:
                    problem = f"{file} fails its checksum"
                finished.append(((file, piece), problem))
            else:
                seen = self._whole.setdefault(file, {})
                seen[piece] = digest
                if problem is not None:
                    finished.append(((file, None), problem))
                elif len(seen) == max(1, -(-info["bytes"] // atomic.PIECE)) and None not in seen.values():
                    tree = atomic.tree_of(info["sha256"])
                    bad = (self.verify and tree is not None
                           and tree.checksum([seen[p] for p in sorted(seen)]) != info["sha256"])
                    finished.append(((file, None), f"{file} fails its checksum" if bad else None))
            for unit, failure in finished:
                if failure is not None:
                    self._failure = self._failure or failure
                for index in self._unit_layers.pop(unit, []):
                    layer = self.layers[index]
                    layer.units.discard(unit)
                    if failure is not None:
                        layer.failure = layer.failure or failure
                    if failure is not None or not layer.units:
                        layer.event.set()
            self._left -= 1
            self._finish_if_done()

    def _finish_if_done(self) -> None:
        """With the lock held: once no piece is left or in flight, close the files and let go of the buffers."""
        if self._left == 0 and not self._all_done.is_set():
            import time

            self.seconds = time.perf_counter() - self._t0
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self.extents.clear()
            self._all_done.set()

    def wait_layer(self, index: int) -> None:
        layer = self.layers[index]
        layer.event.wait()
        if layer.failure is not None:
            raise damaged(self.folder.name, layer.failure)

    def wait(self) -> None:
        """Until everything has streamed in and checked out; SessionError for the first piece that did not."""
        self._all_done.wait()
        if self._failure is not None:
            raise damaged(self.folder.name, self._failure)

    def cancel(self) -> None:
        """Stop streaming (the load failed): layers not yet in refuse to be used."""
        with self._lock:
            self._cancelled = True
            self._left -= len(self._tasks)
            self._tasks.clear()
            self._failure = self._failure or "its loading was stopped"
            for layer in self.layers.values():
                if not layer.event.is_set():
                    layer.failure = layer.failure or self._failure
                    layer.event.set()
            if hasattr(self, "_t0"):
                self._finish_if_done()
            else:
                self._all_done.set()


@atexit.register
def _stop_streams() -> None:
    """A process that ends before its stream does (an answer refused, Ctrl-C) stops it between pieces, so no
    worker is inside a copy to the device while CUDA shuts down."""
    for fill in list(_ACTIVE):
        fill.cancel()
        for thread in getattr(fill, "_threads", []):
            thread.join(timeout=5)
