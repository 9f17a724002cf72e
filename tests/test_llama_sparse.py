"""A dense Llama with the InfLLM-V2 block-sparse cache (a bare SparseParams): equal to dense when the
selection covers everything; and reading past the trained length, which takes the long-context extension
(engine/long_context.py) instead of a refusal."""

import dataclasses

import pytest
import torch
from salachat.engine import long_context
from salachat.engine.sparse_cache import default_sparse_params_for

from salachat.conversation import ContextTooLong, Conversation


def test_sparse_cache_with_covering_topk_equals_dense(smollm2):
    params = dataclasses.replace(default_sparse_params_for(1024), dense_len=64, topk=1000)
    ids = torch.tensor(smollm2.tokenizer.encode("The keeper counted ships every night. " * 30))
    dense = smollm2.model(ids, smollm2.model.new_cache())
    sparse = smollm2.model(ids, smollm2.model.new_cache(sparse=params))
    assert (dense - sparse).abs().max().item() < 1e-3


def test_sparse_selection_differs_from_dense_once_blocks_are_left_out(smollm2):
    params = dataclasses.replace(default_sparse_params_for(1024), dense_len=64, topk=2, local_blocks=1)
    ids = torch.tensor(smollm2.tokenizer.encode("The keeper counted ships every night. " * 60))
    dense = smollm2.model(ids, smollm2.model.new_cache())
    sparse = smollm2.model(ids, smollm2.model.new_cache(sparse=params))
    assert (dense[:64] - sparse[:64]).abs().max().item() < 1e-3  # dense part
    assert (dense[-50:] - sparse[-50:]).abs().max().item() > 1e-2  # sparse part really selects


def test_reading_past_the_trained_length_needs_the_extension(smollm2):
    text = "A line of the book. " * 30
    trained = smollm2.model.args
    limited = dataclasses.replace(smollm2)  # a shallow copy: same weights, its own long-context setting
    smollm2.model.args = dataclasses.replace(trained, max_position_embeddings=128)
    try:
        with pytest.raises(ContextTooLong):
            Conversation(limited).set_documents(text)
        long_context.enable(limited)
        assert limited.sparse.dense_len == 128 and limited.sparse.memory_distance < 128
        conversation = Conversation(limited)
        conversation.set_documents(text)
        conversation.read()
        assert conversation.cache.position > 128
        assert conversation.cache.layers[0].kind == "long_context_kv"
    finally:
        smollm2.model.args = trained
