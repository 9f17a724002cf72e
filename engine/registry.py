"""Moved to salachat/models.py (what a model name means is the product's business); re-exported here only
until the last callers import salachat.models."""

from salachat.engine.loader import ModelLoadError as ModelNotInstalled  # noqa: F401

from salachat.models import (  # noqa: F401
    DEFAULT_MODEL,
    KNOWN_MODELS,
    KnownModel,
    locate,
    pull,
    resolve,
)
