"""salachat: ask questions about very long documents, locally."""

import os as _os

# Installed, engine/, kernels/ and ingest/ are mapped into this package by pyproject's package-dir. Run from a
# source checkout that is not installed (PYTHONPATH=., as on a bare GPU machine), they sit beside this folder.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "engine", "__init__.py")) and _root not in __path__:
    __path__.append(_root)
