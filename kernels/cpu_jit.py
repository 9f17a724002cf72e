"""What the numba-built CPU kernels share: one background thread that imports numba and compiles (or loads
from numba's cache) while the prompt is read, numba set up to be called from several threads, and numba's
thread count following torch's."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

_POOL: list[ThreadPoolExecutor] = []
_LOCAL = threading.local()  # per calling thread: the numba thread count it last set (numba's count is per thread)


def submit(fn, *args) -> Future:
    """Run fn(*args) in the loading thread (one a process, so loads never race each other)."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="salachat-numba"))
    return _POOL[0].submit(fn, *args)


def import_numba():
    import numba

    if numba.config.THREADING_LAYER == "default":
        # a layer that allows calls from several threads at once (workqueue aborts the process on them)
        numba.config.THREADING_LAYER = "threadsafe"
    return numba


def follow_torch_threads() -> int:
    """Set numba's thread count for the calling thread to torch's (salachat's rule in engine/threads.py sets
    torch's); the count."""
    import torch

    threads = torch.get_num_threads()
    if getattr(_LOCAL, "threads", None) != threads:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        _LOCAL.threads = threads
    return threads


def sources_digest(*paths) -> int:
    """A digest of these source files, for a kernel's closure: numba's cache knows the age of the kernel's own
    file, not of the files whose code it takes in, and a closure value is part of its cache key, so a change
    there compiles the kernel again rather than loading a stale one."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return int(digest.hexdigest()[:15], 16)

