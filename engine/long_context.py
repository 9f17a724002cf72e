"""Reading past a dense model's trained length: the parameters of the extension for one model.

`params_for(model)` returns the object `LoadedModel.sparse` holds; `model.new_cache(sparse=…)` builds the
per-layer caches from it.
"""

from __future__ import annotations

from salachat.engine.sparse_cache import default_sparse_params_for


def params_for(model):
    return default_sparse_params_for(model.args.max_position_embeddings)
