"""Dense KV cache and causal attention with an offset: against a naive formula, on CPU and (gpu) CUDA."""

import pytest
import torch
from salachat.engine.cache import KVCache, ModelCache, dense_attention


def naive_attention(q, k, v, pos0, scale):
    group = q.shape[0] // k.shape[0]
    out = torch.empty_like(q, dtype=torch.float32)
    for h in range(q.shape[0]):
        for i in range(q.shape[1]):
            keys, values = k[h // group, : pos0 + i + 1].float(), v[h // group, : pos0 + i + 1].float()
            weights = torch.softmax(keys @ q[h, i].float() * scale, dim=0)
            out[h, i] = weights @ values
    return out


@pytest.mark.parametrize("pos0, t", [(0, 1), (0, 9), (5, 1), (7, 6), (63, 17)])
def test_dense_attention_matches_naive_loop(pos0, t):
    torch.manual_seed(pos0 + t)
    q, k, v = torch.randn(6, t, 16), torch.randn(2, pos0 + t, 16), torch.randn(2, pos0 + t, 16)
    assert torch.allclose(dense_attention(q, k, v, pos0, 0.25), naive_attention(q, k, v, pos0, 0.25), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pos0, t", [(0, 40), (1, 40), (300, 64), (700, 513)])
def test_a_cpu_chunk_is_the_naive_attention_in_fp32_and_bf16(pos0, t, dtype):
    """The CPU chunk path (the prefix without a mask and the chunk causally, merged by log-sum-exp) against the
    naive loop, past flash attention's blocks of queries and keys."""
    torch.manual_seed(pos0 + t)
    q = torch.randn(6, t, 32).to(dtype)
    k, v = torch.randn(2, pos0 + t, 32).to(dtype), torch.randn(2, pos0 + t, 32).to(dtype)
    got = dense_attention(q, k, v, pos0, 32**-0.5)
    assert got.dtype == dtype and got.shape == q.shape
    want = naive_attention(q, k, v, pos0, 32**-0.5)
    assert (got.float() - want).abs().max().item() < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("pos0, t", [(0, 1), (0, 300), (1000, 1), (4097, 257), (70000, 2048)])
def test_dense_attention_cuda_flash_path_matches_reference(pos0, t):
    torch.manual_seed(0)
    q = torch.randn(32, t, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, pos0 + t, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    fast = dense_attention(q, k, v, pos0, 128**-0.5).float()
    query_pos = torch.arange(pos0, pos0 + t, device="cuda")[:, None]
    mask = torch.arange(pos0 + t, device="cuda")[None, :] <= query_pos
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(16, 0), v.float().repeat_interleave(16, 0), attn_mask=mask,
        scale=128**-0.5)
    assert (fast - ref).abs().max().item() < 2e-2


def test_kv_cache_grows_and_round_trips_through_state():
    cache = KVCache(2, 4, torch.float32, "cpu")
    chunks = [torch.randn(2, n, 4) for n in (3, 1, 2000, 5)]
    for chunk in chunks:
        keys, values = cache.update_and_fetch(chunk, chunk * 2)
    expected = torch.cat(chunks, dim=1)
    assert torch.equal(keys, expected) and torch.equal(values, expected * 2)
    model_cache = ModelCache(layers=[cache], position=cache.length)
    tensors, meta = model_cache.state()
    restored = ModelCache.from_state({k: v.clone() for k, v in tensors.items()}, meta)
    assert restored.position == cache.length
    assert torch.equal(restored.layers[0].keys[:, : cache.length], expected)


def test_unknown_cache_kind_is_refused():
    with pytest.raises(ValueError, match="unknown cache kind"):
        ModelCache.from_state({}, {"position": 0, "layers": [{"kind": "martian"}]})


def test_a_bf16_cache_under_fp32_queries_keeps_its_dtype_and_attends_like_fp32():
    torch.manual_seed(1)
    cache = KVCache(2, 16, torch.bfloat16, "cpu")
    exact = KVCache(2, 16, torch.float32, "cpu")
    for pos0, t in [(0, 700), (700, 1), (701, 600)]:  # the second append grows the buffer past GROW
        q, k, v = torch.randn(6, t, 16), torch.randn(2, t, 16), torch.randn(2, t, 16)
        out, want = cache.attend(q, k, v, pos0, 0.25), exact.attend(q, k, v, pos0, 0.25)
        assert cache.keys.dtype == cache.values.dtype == torch.bfloat16 and out.dtype == torch.float32
        assert (out - want).abs().max().item() < 3e-2


def test_caches_reserved_together_share_one_block_and_attend_as_apart():
    torch.manual_seed(2)
    layers = [KVCache(2, 16, torch.bfloat16, "cpu") for _ in range(3)]
    apart = [KVCache(2, 16, torch.bfloat16, "cpu") for _ in range(3)]
    KVCache.reserve_together(layers + ["not a kv cache"], 1500)
    assert all(layer.keys.shape[1] == 2048 for layer in layers)
    assert len({layer.keys.untyped_storage().data_ptr() for layer in layers}) == 1
    for pos0, t in [(0, 700), (700, 1), (701, 1400)]:  # the last append grows one past its reserve
        q, k, v = torch.randn(6, t, 16), torch.randn(2, t, 16), torch.randn(2, t, 16)
        for i, (together, alone) in enumerate(zip(layers, apart)):
            assert torch.equal(together.attend(q, k * i, v, pos0, 0.25), alone.attend(q, k * i, v, pos0, 0.25))


@pytest.mark.parametrize("length", [768, 769, 2081])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float32])
def test_cpu_decode_over_two_halves_of_the_keys_matches_the_reference(length, kv_dtype):
    """A CPU decode step over 3 KV heads on 2 threads attends over the keys' two halves in one flash call
    (odd L: halves overlapping in one key, masked in the second): the naive formula's result, and no further
    from it (RMS over a few draws) than the single call it replaces."""
    from salachat.kernels import dense

    assert dense._split_keys(3, length, threads=2) and not dense._split_keys(3, length, threads=1)
    assert not dense._split_keys(4, length, threads=2) and not dense._split_keys(3, 100, threads=2)
    fast_err, single_err = [], []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for seed in range(6):
            torch.manual_seed(seed)
            # views into a larger buffer at an offset, like a layer's cache in `reserve_together`'s block
            k = torch.randn(2, 3, length + 7, 64).to(kv_dtype)[1, :, :length]
            v = torch.randn(2, 3, length + 7, 64).to(kv_dtype)[1, :, :length]
            k[:, 0] *= 4  # a key that takes much of the softmax, like an attention sink
            q = torch.randn(9, 1, 64) * 3
            fast = dense_attention(q, k, v, length - 1, 0.125)
            single = torch.nn.functional.scaled_dot_product_attention(
                q.to(kv_dtype).reshape(3, 3, 64)[None], k[None], v[None], scale=0.125)[0].reshape(9, 1, 64).float()
            exact = naive_attention(q.to(kv_dtype).double(), k.double(), v.double(), length - 1, 0.125)
            assert fast.dtype == torch.float32 and fast.shape == (9, 1, 64)
            assert (fast - exact).abs().max().item() < (2e-2 if kv_dtype == torch.bfloat16 else 1e-5)
            fast_err.append((fast - exact).pow(2).mean().item())
            single_err.append((single - exact).pow(2).mean().item())
    finally:
        torch.set_num_threads(before)
    assert sum(fast_err) ** 0.5 <= 1.25 * sum(single_err) ** 0.5 + 1e-7
