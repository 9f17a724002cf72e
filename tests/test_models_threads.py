"""The CPU thread count follows the cores the process may use and the load others put on them."""

import pytest
import torch
from salachat.engine import threads


def test_pick_follows_the_cores_left_free():
    assert threads.pick_threads(cores=2, load=0.1) == 2
    assert threads.pick_threads(cores=2, load=10.0) == 1  # a busy machine: never more threads than free cores
    assert threads.pick_threads(cores=2, load=2.0, ours=2) == 2  # the load is our own threads
    assert threads.pick_threads(cores=16, load=4.0) == 12
    assert threads.pick_threads(cores=1, load=0.0) == 1


def test_configure_uses_the_affinity_not_the_machine(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(threads, "_state", {"threads": None, "checked": 0.0, "fixed": False})
    try:
        assert threads.usable_cores() == 1
        assert threads.configure_threads() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("value", ["1", "3"])
def test_salachat_threads_overrides(monkeypatch, value):
    before = torch.get_num_threads()
    monkeypatch.setenv("SALACHAT_THREADS", value)
    monkeypatch.setattr(threads, "_state", {"threads": None, "checked": 0.0, "fixed": False})
    try:
        assert threads.configure_threads() == int(value) == torch.get_num_threads()
        threads._state["checked"] = -1e9
        threads.keep_fitting()  # a fixed count is never revised
        assert torch.get_num_threads() == int(value)
    finally:
        torch.set_num_threads(before)
