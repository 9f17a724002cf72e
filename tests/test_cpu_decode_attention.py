"""The CPU decode attention kernel (numba, kernels/cpu_decode/) against its float64 definition, and the paths
around it: the model's decode step through it, and torch's flash path when numba cannot serve."""

import pytest
import torch
from salachat.kernels import cpu_decode, dense
from salachat.kernels.cpu_decode.reference import decode_attention_ref

pytest.importorskip("numba")


def _cache(kv_heads, capacity, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    k = (torch.randn(kv_heads, capacity, dim, generator=gen) * 2).bfloat16()
    v = torch.randn(kv_heads, capacity, dim, generator=gen).bfloat16()
    return k, v


# lengths across the 16-key groups and the splits' edges (odd, one key, a group plus one); G 1, 3, 4, 7; D 64,
# 128; views of a cache whose capacity is past the length (the heads a capacity apart)
@pytest.mark.parametrize("kv_heads, group, dim, length, threads", [
    (3, 3, 64, 2048, 2), (3, 3, 64, 1, 2), (3, 3, 64, 17, 2), (2, 4, 128, 1000, 2), (1, 7, 64, 333, 1),
    (3, 1, 64, 771, 3), (2, 3, 64, 16, 2),
])
def test_kernel_matches_the_float64_reference(kv_heads, group, dim, length, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    k, v = _cache(kv_heads, length + 100, dim, length)
    q = torch.randn(kv_heads, group, dim, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = cpu_decode.decode_attention(q, k[:, :length], v[:, :length], dim**-0.5)
    want = decode_attention_ref(q, k[:, :length], v[:, :length], dim**-0.5)
    assert got is not None and got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max().item() < 2e-5  # fp32 throughout: far closer than bf16 flash attention


def test_the_kernel_is_closer_to_the_definition_than_torchs_flash_path():
    k, v = _cache(3, 4096, 64, 7)
    q = torch.randn(9, 1, 64, generator=torch.Generator().manual_seed(2))
    want = decode_attention_ref(q.reshape(3, 3, 64), k[:, :3000], v[:, :3000], 0.125).reshape(9, 1, 64)
    ours = dense._grouped_sdpa(q.bfloat16(), k[:, :3000], v[:, :3000], 2999, 0.125, torch.float32)
    cpu_decode._FAILED.append("off for this test")
    try:
        flash = dense._grouped_sdpa(q.bfloat16(), k[:, :3000], v[:, :3000], 2999, 0.125, torch.float32)
    finally:
        cpu_decode._FAILED.remove("off for this test")
    assert (ours - want).abs().max() < (flash - want).abs().max()


def test_without_numba_decode_keeps_torchs_path_and_says_so_once(monkeypatch):
    monkeypatch.setattr(cpu_decode, "_LOADS", {})
    monkeypatch.setattr(cpu_decode, "_FAILED", [])

    def missing(group, dim):
        raise ImportError("No module named 'numba'")

    monkeypatch.setattr(cpu_decode, "_load", missing)
    k, v = _cache(3, 2048, 64, 3)
    q = torch.randn(9, 1, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    with pytest.warns(RuntimeWarning, match="numba decode attention unavailable"):
        out = dense._grouped_sdpa(q, k, v, 2047, 0.125, torch.float32)
    want = decode_attention_ref(q.reshape(3, 3, 64), k, v, 0.125).reshape(9, 1, 64)
    assert (out - want).abs().max().item() < 2e-2  # torch's flash attention (bf16 q) served the step
    assert cpu_decode._FAILED and not cpu_decode.wanted(q, k, v, 2048)  # once: then not asked again


def test_short_caches_and_fp32_caches_are_not_the_kernels():
    k, v = _cache(3, 2048, 64, 4)
    q = torch.randn(9, 1, 64).bfloat16()
    assert cpu_decode.wanted(q, k, v, 2048) and not cpu_decode.wanted(q, k, v, cpu_decode.MIN_KEYS - 1)
    assert not cpu_decode.wanted(q.float(), k.float(), v.float(), 2048)
