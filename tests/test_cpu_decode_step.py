"""The whole decode step in one numba call (`kernels/cpu_decode/numba_step.py`) against the same step taken layer
by layer (`Block.decode_packed`, each kernel called from Python): the same bits, token after token, with the
cache growing under it, over bf16 and fp16 caches and each GGUF kind."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("numba")
pytest.importorskip("gguf")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))

from salachat.engine.cache import KVCache  # noqa: E402
from salachat.engine.loader import load_model  # noqa: E402
from salachat.kernels import cpu_decode  # noqa: E402
from test_models_families import IDS, write_gguf  # noqa: E402


def _decode(model, cache_of, prompt: int, steps: int):
    """Logits of `steps` tokens after a `prompt`-token reading (the tokens fed are IDS's, not the argmax, so
    both runs see the same inputs), and the cache after them."""
    cache = cache_of()
    model(IDS[:prompt], cache)
    logits = torch.cat([model(IDS[i : i + 1], cache) for i in range(prompt, prompt + steps)])
    return logits, cache


@pytest.mark.parametrize("qtype,kv_dtype", [("Q4_1", torch.float16), ("Q8_0", torch.bfloat16),
                                            ("Q4_0", torch.float16)])
def test_the_fused_step_gives_the_layer_by_layer_bits(tmp_path, monkeypatch, qtype, kv_dtype):
    write_gguf(tmp_path / "m.gguf", "llama3", qtype)
    loaded = load_model(tmp_path / "m.gguf", device="cpu")
    model = loaded.model
    model.kv_dtype = kv_dtype
    monkeypatch.setattr(cpu_decode, "MIN_KEYS", 1)  # the layer-by-layer step takes the numba attention too
    monkeypatch.setattr(KVCache, "GROW", 16)  # the cache regrows (and moves) every few tokens under the step
    taken = []
    real = cpu_decode.decode_step
    monkeypatch.setattr(cpu_decode, "decode_step", lambda *a: taken.append(real(*a)) or taken[-1])
    runs = {}
    for fused in (True, False):
        model.fused_decode = fused
        runs[fused] = _decode(model, loaded.new_cache, 40, 30)
    assert taken == [True] * 30
    assert torch.equal(runs[True][0], runs[False][0])
    for a, b in zip(runs[True][1].layers, runs[False][1].layers):
        assert a.length == b.length == 70 and a.keys.dtype == kv_dtype
        assert torch.equal(a.state()["keys"], b.state()["keys"]) and torch.equal(a.state()["values"], b.state()["values"])


def test_the_fused_step_below_the_attention_kernels_threshold_follows_torchs_attention(tmp_path):
    """Below MIN_KEYS the layer-by-layer step attends with torch (q not rounded to the cache's 16 bits), the
    fused one with the kernel: logits within rounding, the same greedy tokens."""
    write_gguf(tmp_path / "m.gguf", "llama3", "Q8_0")
    loaded = load_model(tmp_path / "m.gguf", device="cpu")
    model = loaded.model
    runs = {}
    for fused in (True, False):
        model.fused_decode = fused
        runs[fused] = _decode(model, loaded.new_cache, 20, 12)[0]
    scale = runs[False].abs().max()
    assert (runs[True] - runs[False]).abs().max() < 2e-2 * scale
    assert torch.equal(runs[True].argmax(-1), runs[False].argmax(-1))


def test_a_model_the_step_does_not_fit_decodes_layer_by_layer(tmp_path, monkeypatch):
    """A layer whose kind the step lacks (here: forced by the table's check) leaves the layer-by-layer path in
    charge, with its own bits."""
    from salachat.kernels.cpu_decode import numba_step

    write_gguf(tmp_path / "m.gguf", "llama3", "Q8_0")
    loaded = load_model(tmp_path / "m.gguf", device="cpu")
    model = loaded.model
    monkeypatch.setattr(numba_step, "KINDS", ("Q4_0", "Q4_1"))
    called = []
    monkeypatch.setattr(cpu_decode, "decode_step", lambda *a: called.append(1))
    model.fused_decode = False
    unfused = _decode(model, loaded.new_cache, 20, 4)[0]
    model.fused_decode = True
    assert model._step_weights() is None
    assert torch.equal(_decode(model, loaded.new_cache, 20, 4)[0], unfused)
    assert not called
