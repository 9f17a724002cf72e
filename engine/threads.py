"""How many threads torch's CPU kernels use: the cores this process may run on that others leave free.

torch's default counts the machine's cores, not the ones the process is allowed (a container's cpuset,
`taskset`), and ignores what else runs: its OpenMP threads then wait at every barrier for a sibling that
another process has preempted. Measured on a 2-core machine under a competing load (load average 10):
decode 0.2-0.4 tokens/s with 2 threads against 6.0-6.8 with one, prefill 11 against 64-84 tokens/s. So:
the cores of os.sched_getaffinity less the load others put on them (the load average less our own
threads), at least one, looked at again every few seconds while the model runs. SALACHAT_THREADS fixes it.
"""

from __future__ import annotations

import os
import time

import torch

RECHECK_SECONDS = 5.0
_state = {"threads": None, "checked": 0.0, "fixed": False}


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def pick_threads(cores: int | None = None, load: float | None = None, ours: int = 0) -> int:
    """Threads for `cores` usable cores when the load average is `load`, `ours` of which are our threads."""
    cores = usable_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    others = max(0.0, load - ours)
    return max(1, min(cores, cores - int(others + 0.5)))


def configure_threads() -> int:
    """Set torch's thread count for this process now (SALACHAT_THREADS, if set, once and for all)."""
    override = os.environ.get("SALACHAT_THREADS", "")
    if override.isdigit() and int(override) > 0:
        _state.update(threads=int(override), fixed=True)
    elif not _state["fixed"]:
        _state["threads"] = pick_threads()
    torch.set_num_threads(_state["threads"])
    _state["checked"] = time.monotonic()
    return _state["threads"]


def keep_fitting() -> None:
    """Called per forward pass: every RECHECK_SECONDS, follow the load others put on the cores."""
    if _state["fixed"] or _state["threads"] is None or time.monotonic() - _state["checked"] < RECHECK_SECONDS:
        return
    _state["checked"] = time.monotonic()
    threads = pick_threads(ours=torch.get_num_threads())
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        _state["threads"] = threads
