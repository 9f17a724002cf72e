"""What the numba-built CPU kernels share: one background thread that imports numba and compiles (or loads
from numba's cache) while the prompt is read, numba set up to be called from several threads, and numba's
thread count following torch's."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

_POOL: list[ThreadPoolExecutor] = []
_LOCAL = threading.local()  # per calling thread: the numba thread count it last set (numba's count is per thread)
_PENDING = [0]  # loads submitted and not yet finished
_LOCK = threading.Lock()


def submit(fn, *args) -> Future:
    """Run fn(*args) in the loading thread (one a process, so loads never race each other); when the last
    pending load is done, LLVM's code pages go back to the system (`release_compiler_pages`)."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="salachat-numba"))

    def run():
        try:
            return fn(*args)
        finally:
            with _LOCK:
                _PENDING[0] -= 1
                last = _PENDING[0] == 0
            if last:
                release_compiler_pages()

    with _LOCK:
        _PENDING[0] += 1
    return _POOL[0].submit(run)


MADV_PAGEOUT = 21  # Linux 5.4 on


def release_compiler_pages() -> int:
    """Hand the pages of LLVM's library (llvmlite's) that this process has read back to the system; the bytes.

    numba needs LLVM only to compile or to load kernels from its cache; the kernels, once loaded, are machine
    code of their own. The library's code that importing numba and loading the kernels touched stays resident,
    68 MiB of the default model's 8K reading's peak on Linux (3/4 of its weights). Its read-only mappings are
    clean pages of the library file: MADV_PAGEOUT reclaims them, and a later load reads back what it needs
    (about 10 MiB for one more kernel). Nothing where the system lacks it (not Linux, an older kernel)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or "llvmlite" not in sys.modules:
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        released = 0
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                # only read-only mappings of the library: a written page of its data is not the file's
                if len(fields) > 5 and fields[5].endswith("libllvmlite.so") and "w" not in fields[1]:
                    low, high = (int(x, 16) for x in fields[0].split("-"))
                    if libc.madvise(low, high - low, MADV_PAGEOUT) == 0:
                        released += high - low
        return released
    except (OSError, AttributeError, ValueError):
        return 0


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

