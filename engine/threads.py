"""How many threads torch's CPU kernels use: one per core this process may run on, never more.

torch's default counts the machine's cores, not the ones the process is allowed (a container's cpuset,
`taskset`), and oversubscribed OpenMP threads spin-wait on one another: under a competing load on a
2-core machine decode fell to 0.7 tokens/s with the default against 13.5 with one thread. So: the cores
of os.sched_getaffinity, less one when the machine is already busy with other work (its load average
above the cores we may use), at least one. SALACHAT_THREADS overrides.
"""

from __future__ import annotations

import os

import torch

_configured: int | None = None


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def pick_threads(cores: int | None = None, load: float | None = None) -> int:
    cores = usable_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    # another process already keeps the cores busy: leave it one, so no thread of ours waits on a
    # preempted sibling at every barrier
    return max(1, cores - 1) if load >= cores > 1 else cores


def configure_threads() -> int:
    """Set torch's thread count once per process (an explicit torch.set_num_threads before wins)."""
    global _configured
    if _configured is not None:
        return _configured
    override = os.environ.get("SALACHAT_THREADS")
    if override and override.isdigit() and int(override) > 0:
        threads = int(override)
    else:
        threads = min(pick_threads(), torch.get_num_threads())
    torch.set_num_threads(threads)
    _configured = threads
    return threads
