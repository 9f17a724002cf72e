"""salachat: ask questions about very long documents, locally."""

import os as _os

# Installed, engine/, kernels/ and ingest/ are mapped into this package by pyproject's package-dir. Run from a
# source checkout that is not installed (PYTHONPATH=., as on a bare GPU machine), they sit beside this folder.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "engine", "__init__.py")) and _root not in __path__:
    __path__.append(_root)

# torch's CPU kernels run on torch's own libgomp and numba's on the system's: two OpenMP pools, more threads than
# cores, and libgomp then waits for work by sleeping almost at once (100 spins), so every parallel region of a
# decode step (~150 a token) pays a kernel wake-up. Spinning a little longer first (1000 rounds, microseconds:
# idle cores stay idle) took the default model's decode step from 25.8-26.4 to 16.6-18.2 ms on 2 cores under
# the same load (11.1-11.4 on a quiet machine). Both runtimes read it when they load, so it is set before torch
# is imported; a value the user set is kept.
if "torch" not in __import__("sys").modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
    _os.environ.setdefault("GOMP_SPINCOUNT", "1000")
