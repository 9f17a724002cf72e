"""The CPU decode attention kernel (numba, kernels/cpu_decode/) against its float64 definition, and the paths
around it: the model's decode step through it, and torch's flash path when numba cannot serve."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from salachat.kernels import cpu_decode, dense
from salachat.kernels.cpu_decode.reference import decode_attention_ref

numba = pytest.importorskip("numba")


def _cache(kv_heads, capacity, dim, seed, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    k = (torch.randn(kv_heads, capacity, dim, generator=gen) * 2).to(dtype)
    v = torch.randn(kv_heads, capacity, dim, generator=gen).to(dtype)
    return k, v



def _errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max-abs, relative RMS) error."""
    diff = got.double() - want.double()
    return diff.abs().max().item(), (diff.pow(2).mean().sqrt() / want.double().pow(2).mean().sqrt()).item()


def _drifting_cache(kv_heads, length, capacity, dim, seed):
    """k, v views [Hkv, length, D] of a [2, Hkv, capacity, D] block, scores spread wide (exp underflows for
    some keys) and keys drifting so that the running max grows from one group of 16 keys to the next."""
    g = torch.Generator().manual_seed(seed)
    block = torch.randn(2, kv_heads, capacity, dim, generator=g) * 3
    block[0] += torch.linspace(0, 3, capacity)[None, :, None]
    block = block.bfloat16()
    return block[0, :, :length], block[1, :, :length]


# lengths across the 16-key groups and the splits' edges (odd, one key, a group plus one); G 1, 3, 4, 7; D 64,
# 128; views of a cache whose capacity is past the length (the heads a capacity apart)
@pytest.mark.parametrize("kv_heads, group, dim, length, threads", [
    (3, 3, 64, 2048, 2), (3, 3, 64, 1, 2), (3, 3, 64, 17, 2), (2, 4, 128, 1000, 2), (1, 7, 64, 333, 1),
    (3, 1, 64, 771, 3), (2, 3, 64, 16, 2),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])  # the cache of a CPU with bf16 arithmetic, and not
def test_kernel_matches_the_float64_reference(kv_heads, group, dim, length, threads, dtype, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    k, v = _cache(kv_heads, length + 100, dim, length, dtype)
    q = torch.randn(kv_heads, group, dim, generator=torch.Generator().manual_seed(1)).to(dtype)
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

    def missing(group, dim, half):
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
    assert cpu_decode.wanted(q.half(), k.half(), v.half(), 2048) and not cpu_decode.wanted(q, k.half(), v.half(), 2048)


def test_a_prompt_over_an_fp16_cache_is_read_in_fp32():
    """A CPU without bf16 arithmetic keeps K/V in fp16 and its chunk attention in fp32 (torch's fp16 path is
    slower): fp32 queries over the fp16 cache give the fp32 answer over the same numbers."""
    k, v = _cache(3, 300, 64, 6, torch.float16)
    q = torch.randn(9, 40, 64, generator=torch.Generator().manual_seed(6))
    got = dense.dense_attention_impl(q, k, v, 260, 0.125)
    want = dense.dense_attention_impl(q, k.float(), v.float(), 260, 0.125)
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize(
    "kv_heads, group, dim, length, splits",
    [(3, 3, 64, 1, 1), (3, 3, 64, 1, 4), (3, 3, 64, 17, 2), (3, 3, 64, 63, 6), (3, 3, 64, 1000, 2),
     (3, 3, 64, 4097, 4), (2, 1, 64, 300, 3), (2, 4, 128, 1001, 2), (1, 2, 128, 16, 1), (2, 2, 32, 33, 7)],
    ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_over_explicit_splits_equals_the_float64_definition(kv_heads, group, dim, length, splits, dtype):
    """The compiled kernel itself at explicit splits: lengths across the 16-key groups and the split edges
    (1, 17, 63, 4097; more splits than keys leaves tasks empty), G 1-4, D 32-128, the capacity beyond the
    length; bf16 and fp16 rows."""
    from salachat.kernels.cpu_decode.numba_attention import kernel

    k, v = _drifting_cache(kv_heads, length, length + 37, dim, length)
    k, v = k.to(dtype), v.to(dtype)
    q = (torch.randn(kv_heads, group, dim, generator=torch.Generator().manual_seed(7)) * 2).to(dtype)
    scale = dim**-0.5
    out = torch.empty(kv_heads, group, dim)
    partial = np.empty((kv_heads * splits, group, dim + 2), np.float32)
    kernel(group, dim, dtype == torch.float16)(q.data_ptr(), k.data_ptr(), v.data_ptr(), kv_heads,
                                               (k.stride(0), k.stride(1), v.stride(0), v.stride(1)), length, scale,
                                               splits, partial, out.data_ptr())
    max_abs, rel = _errors(out, decode_attention_ref(q, k, v, scale))
    assert max_abs < 2e-5 and rel < 2e-6, (max_abs, rel)


def test_numbas_threads_follow_torchs():
    k, v = _cache(3, 1024, 64, 5)
    q = torch.randn(3, 3, 64).to(torch.bfloat16)
    before = torch.get_num_threads()
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            torch.set_num_threads(threads)
            assert cpu_decode.decode_attention(q, k, v, 0.125) is not None
            assert numba.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_packed_model_decodes_the_same_greedy_tokens_through_the_kernel(tmp_path, monkeypatch):
    """The tiny packed Llama (G 2, D 32) decoding 24 greedy tokens after a 90-token prompt: the same tokens
    through the kernel as through torch's path, and the kernel was taken."""
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parent))
    from salachat.engine.loader import load_model
    from test_models_families import IDS, write_gguf

    write_gguf(tmp_path / "m.gguf", "llama3", "Q4_1")
    loaded = load_model(tmp_path / "m.gguf", device="cpu")
    loaded.model.fused_decode = False  # the kernel called layer by layer (the fused step: test_cpu_decode_step)
    calls = []
    real = cpu_decode.decode_attention
    monkeypatch.setattr(cpu_decode, "decode_attention", lambda *a: calls.append(1) or real(*a))
    runs = {}
    for name, min_keys in (("kernel", 64), ("torch", 1 << 40)):
        monkeypatch.setattr(cpu_decode, "MIN_KEYS", min_keys)
        cache = loaded.new_cache()
        logits = loaded.model(IDS[:90], cache)[-1]
        tokens = []
        for _ in range(24):
            tokens.append(int(logits.argmax()))
            logits = loaded.model(torch.tensor(tokens[-1:]), cache)[-1]
        runs[name] = tokens
    assert len(calls) == 24 * 2  # every decode step, both layers
    assert runs["kernel"] == runs["torch"]


def test_an_unwritable_numba_cache_still_runs_without_a_traceback(tmp_path):
    """NUMBA_CACHE_DIR where no folder can be made (under a file: even root cannot): compiled for the process."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = ("import torch\nfrom salachat.kernels import cpu_decode\n"
            "k = torch.randn(3, 800, 64).to(torch.bfloat16)\nq = torch.randn(3, 3, 64).to(torch.bfloat16)\n"
            "print(cpu_decode.decode_attention(q, k, k, 0.125) is not None)\n")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(blocker / "numba")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.strip() == "True"
