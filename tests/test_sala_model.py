"""MiniCPM-SALA on tiny random checkpoints in the real HF format: every path (dense, sparse, lightning)."""

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from sala_tiny import tiny_config, write_tiny_checkpoint
from salachat.engine.cache import ModelCache
from salachat.engine.lightning_state import LightningState
from salachat.engine.loader import ModelLoadError, load_model
from salachat.kernels import SparseParams
from test_kernels_reference import naive_selection

TOL = 2e-5  # fp32, over 4 layers: order-of-summation differences only


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("sala") / "tiny")
    return load_model(str(folder), device="cpu", dtype=torch.float32)


def projected(attn, x, names):
    """The named projections of x, whether loading fused them into one Linear (fuse_projections) or not."""
    if attn.k_proj is None:
        return list(attn.q_proj(x).split(attn.q_proj.sizes, dim=-1))
    return [getattr(attn, n)(x) for n in names]


def states_equal(a: ModelCache, b: ModelCache, tol=TOL) -> bool:
    ta, _ = a.state()
    tb, _ = b.state()
    return ta.keys() == tb.keys() and all(torch.allclose(ta[n], tb[n], atol=tol, rtol=tol) for n in ta)


def test_one_shot_chunked_and_token_by_token_agree_past_dense_len(tiny):
    ids = torch.randint(5, 320, (260,), generator=torch.Generator().manual_seed(0))
    assert ids.shape[0] > tiny.model.args.sparse.dense_len * 2  # the sparse path runs for most tokens
    one_cache = tiny.new_cache()
    one_shot = tiny.model(ids, one_cache)
    rng = random.Random(1)
    for _ in range(2):
        cache, outs, begin = tiny.new_cache(), [], 0
        while begin < len(ids):
            size = rng.randint(1, 70)
            outs.append(tiny.model(ids[begin : begin + size], cache))
            begin += size
        assert (torch.cat(outs) - one_shot).abs().max().item() < TOL
        assert states_equal(cache, one_cache)
    step_cache = tiny.new_cache()
    stepped = torch.cat([tiny.model(ids[i : i + 1], step_cache) for i in range(len(ids))])
    assert (stepped - one_shot).abs().max().item() < TOL
    assert states_equal(step_cache, one_cache)


def test_sparse_selection_covering_every_block_equals_dense_attention(tmp_path):
    covering = tiny_config(sparse_config={"kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "block_size": 16,
                                          "window_size": 32, "topk": 1000, "dense_len": 20})
    dense = tiny_config(sparse_config={**covering["sparse_config"], "dense_len": 10**9})
    a = load_model(str(write_tiny_checkpoint(tmp_path / "a", covering)), device="cpu", dtype=torch.float32)
    b = load_model(str(write_tiny_checkpoint(tmp_path / "b", dense)), device="cpu", dtype=torch.float32)
    ids = torch.randint(5, 320, (200,), generator=torch.Generator().manual_seed(2))
    assert (a.model(ids, a.new_cache()) - b.model(ids, b.new_cache())).abs().max().item() < TOL


def rms(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(x, positions, theta):
    d = x.shape[-1]
    out = torch.empty_like(x)
    for n, pos in enumerate(positions):
        for i in range(d // 2):
            angle = pos / theta ** (2 * i / d)
            a, b = x[..., n, i], x[..., n, i + d // 2]
            out[..., n, i] = a * math.cos(angle) - b * math.sin(angle)
            out[..., n, i + d // 2] = b * math.cos(angle) + a * math.sin(angle)
    return out


def test_lightning_mixer_equals_a_token_loop(tiny):
    layer = tiny.model.model.layers[1]
    attn = layer.self_attn
    assert not layer.sparse
    torch.manual_seed(3)
    x = torch.randn(30, 64)
    from salachat.engine.lightning_state import LightningState

    got = attn(x, *tiny_rope(tiny, 30), LightningState(4, 16, "cpu"))
    heads, d = 4, 16
    q, k, v, z = projected(attn, x, ["q_proj", "k_proj", "v_proj", "z_proj"])
    q = rms(q.reshape(30, heads, d), attn.q_norm.weight).transpose(0, 1)
    k = rms(k.reshape(30, heads, d), attn.k_norm.weight).transpose(0, 1)
    v = v.reshape(30, heads, d).transpose(0, 1)
    q, k = rope(q, range(30), 10000.0), rope(k, range(30), 10000.0)
    start = 2 ** (-(2 ** -(math.log2(heads) - 3)))  # ALiBi: 2^-2 for 4 heads
    slopes = [start ** (h + 1) for h in range(heads)]
    out = torch.zeros(30, heads * d)
    for h in range(heads):
        s = torch.zeros(d, d)
        for i in range(30):
            s = math.exp(-slopes[h]) * s + torch.outer(k[h, i], v[h, i])
            out[i, h * d : (h + 1) * d] = d**-0.5 * q[h, i] @ s
    expected = attn.o_proj(rms(out, attn.o_norm.weight) * torch.sigmoid(z))
    assert (got - expected).abs().max().item() < 1e-4


def test_fused_projections_give_the_separate_projections_logits(tiny):
    """Loading fuses each layer's q/k/v (and Lightning's gate) and each MLP's gate/up into one matmul; the
    model built from the same checkpoint without fusing gives the same logits and the same states."""
    from safetensors.torch import load_file
    from salachat.engine.models.sala import SalaArgs, SalaForCausalLM

    fused = tiny.model
    assert all(layer.self_attn.k_proj is None and layer.mlp.up_proj is None for layer in fused.model.layers)
    folder = Path(tiny.model_id)
    separate = SalaForCausalLM(SalaArgs.from_config(json.loads((folder / "config.json").read_text())))
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    separate.load_state_dict(tensors)
    separate = separate.float().eval()
    ids = torch.randint(5, 320, (150,), generator=torch.Generator().manual_seed(11))  # past dense_len (96)
    c1, c2 = tiny.new_cache(), separate.new_cache()
    got, want = fused(ids, c1), separate(ids, c2)
    assert (got - want).abs().max().item() < TOL
    assert states_equal(c1, c2)
    for i in range(3):  # decode
        tok = ids[i : i + 1]
        assert (fused(tok, c1) - separate(tok, c2)).abs().max().item() < TOL


def tiny_rope(loaded, t, pos0=0):
    from salachat.engine.models.llama import rope_cos_sin

    return rope_cos_sin(torch.arange(pos0, pos0 + t), 16, 10000.0)


def test_sparse_mixer_equals_naive_selection_and_attention(tiny):
    layer = tiny.model.model.layers[0]
    attn = layer.self_attn
    assert layer.sparse
    params: SparseParams = tiny.model.args.sparse
    torch.manual_seed(4)
    t = 180
    x = torch.randn(t, 64)
    cache = tiny.new_cache().layers[0]
    got = attn(x, *tiny_rope(tiny, t), cache, 0)
    q, k, v = projected(attn, x, ["q_proj", "k_proj", "v_proj"])
    q, k, v = q.reshape(t, 4, 16).transpose(0, 1), k.reshape(t, 2, 16).transpose(0, 1), v.reshape(t, 2, 16).transpose(0, 1)
    selection = naive_selection(q, k, 0, params, 16**-0.5)
    out = torch.zeros(t, 64)
    for h in range(4):
        g = h // 2
        for i in range(t):
            if i + 1 < params.dense_len:
                tokens = list(range(i + 1))
            else:
                tokens = [tok for b in selection[g, i].tolist() if b >= 0
                          for tok in range(b * params.block_size, (b + 1) * params.block_size) if tok <= i]
            w = torch.softmax(torch.stack([q[h, i] @ k[g, tok] * 16**-0.5 for tok in tokens]), 0)
            out[i, h * 16 : (h + 1) * 16] = sum(w[n] * v[g, tok] for n, tok in enumerate(tokens))
    expected = attn.o_proj(out * torch.sigmoid(attn.o_gate(x)))
    assert (got - expected).abs().max().item() < 1e-4


def test_compressed_keys_kept_incrementally_equal_recomputation(tiny):
    from salachat.kernels.sparse.reference import compress_keys_ref

    cache = tiny.new_cache()
    ids = torch.randint(5, 320, (157,), generator=torch.Generator().manual_seed(5))
    for chunk in torch.split(ids, [3, 1, 36, 1, 59, 57]):
        tiny.model(chunk, cache)
    layer = cache.layers[0]
    p = layer.params
    state = layer.state()
    assert torch.equal(state["k1"], compress_keys_ref(state["keys"], p.kernel_size, p.kernel_stride))
    assert torch.equal(state["k2"], compress_keys_ref(state["keys"], 4 * p.kernel_size, 4 * p.kernel_stride))


def test_state_round_trip_continues_exactly(tiny):
    ids = torch.randint(5, 320, (150,), generator=torch.Generator().manual_seed(6))
    cache = tiny.new_cache()
    tiny.model(ids[:120], cache)
    tensors, meta = cache.state()
    restored = ModelCache.from_state({k: v.clone() for k, v in tensors.items()}, meta)
    assert torch.equal(tiny.model(ids[120:], cache), tiny.model(ids[120:], restored))


@pytest.mark.parametrize("drop, reshape, name", [
    ("model.layers.1.self_attn.z_proj.weight", None, "model.layers.1.self_attn.z_proj.weight"),
    (None, "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.k_proj.weight"),
])
def test_missing_or_misshaped_tensor_is_named(tmp_path, drop, reshape, name):
    folder = write_tiny_checkpoint(tmp_path / "bad", drop=drop, reshape=reshape)
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        load_model(str(folder), device="cpu")


def test_config_errors_are_clear(tmp_path):
    import json

    folder = write_tiny_checkpoint(tmp_path / "x")
    (folder / "config.json").write_text(json.dumps(tiny_config(model_type="gpt9")))
    with pytest.raises(ModelLoadError, match="gpt9"):
        load_model(str(folder), device="cpu")
    config = tiny_config()
    del config["mixer_types"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="mixer_types"):
        load_model(str(folder), device="cpu")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize("mode, limit", [("int8", 0.05), ("nf4", 0.3)])
def test_quantised_logits_stay_near_bf16(tiny, mode, limit):
    folder = tiny.model_id
    base = load_model(folder, device="cpu", dtype=torch.bfloat16)
    quant = load_model(folder, device="cpu", dtype=torch.bfloat16, quant=mode)
    ids = torch.randint(5, 320, (120,), generator=torch.Generator().manual_seed(7))
    reference = base.model(ids, base.new_cache())
    diff = (quant.model(ids, quant.new_cache()) - reference).abs().max().item()
    # stated distance: max-abs logit error relative to the largest bf16 logit
    assert diff / reference.abs().max().item() < limit, diff


def test_chat_with_the_checkpoint_template(tiny):
    from salachat.engine.generate import Sampling

    from salachat.conversation import Conversation

    conversation = Conversation(tiny)
    conversation.set_documents("Some notes.")
    answer = "".join(conversation.ask("What?", Sampling(max_tokens=5)))
    assert isinstance(answer, str) and conversation.cache.position > 0
    assert conversation.fed_text.startswith("<|im_start|>system\n")


@pytest.mark.gpu
def test_decode_through_cuda_graphs_equals_eager_decode(tmp_path):
    """The Lightning layers' decode replayed from CUDA graphs gives the eager logits bit for bit, across
    several tokens (captured on the second token, replayed after; graphs read other graphs' outputs in
    place), across a new cache, and after a state tensor is replaced (as a resume does)."""
    folder = write_tiny_checkpoint(tmp_path / "tiny")
    graphed = load_model(str(folder), device="cuda", dtype=torch.float32)
    eager = load_model(str(folder), device="cuda", dtype=torch.float32)
    eager.model._graphs = None
    ids = torch.randint(5, 320, (90,), generator=torch.Generator().manual_seed(4)).cuda()
    for _ in range(2):
        c1, c2 = graphed.new_cache(), eager.new_cache()
        graphed.model(ids[:40], c1), eager.model(ids[:40], c2)
        for i in range(40, 90):
            if i == 70:  # a new state tensor: the graphs holding the old address are captured again
                state = next(layer for layer in c1.layers if isinstance(layer, LightningState))
                state.recurrent = state.recurrent.clone()
            a, b = graphed.model(ids[i : i + 1], c1), eager.model(ids[i : i + 1], c2)
            assert torch.equal(a, b), f"token {i}"
        assert graphed.model._graphs is not None and graphed.model._graphs.captured
        assert states_equal(c1, c2, tol=0)


@pytest.mark.slow
def test_e2e_bench_smoke_times_each_chunk_and_reads_the_baseline_in_halves_past_out_of_memory(tmp_path, monkeypatch):
    """bench/e2e.py at tiny shapes on the CPU: the hybrid is read at each chunk size and the best one kept;
    the dense baseline tries one shot first and, out of memory, halves (faked here past 80 tokens); the
    JSON says what was tried and the hybrid's speed-up over the baseline."""
    import json

    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    import e2e

    real_read = e2e.read

    def read(model, ids, cache, chunk, deadline):
        if hasattr(model, "rotary") and chunk > 80:  # the Llama-family baseline
            raise torch.OutOfMemoryError("faked")
        return real_read(model, ids, cache, chunk, deadline)

    monkeypatch.setattr(e2e, "read", read)
    out = tmp_path / "e2e.json"
    report = e2e.main(["--smoke", "--models", "sala", "dense", "--contexts", "160", "--chunks", "40", "80",
                       "--decode-tokens", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    sala, dense = saved["runs"]["sala"]["contexts"]["160"], saved["runs"]["dense"]["contexts"]["160"]
    assert sala["status"] == "ok" and set(sala["chunks_tried"]) == {"40", "80"}
    assert str(sala["chunk"]) == min(sala["chunks_tried"], key=sala["chunks_tried"].get)
    assert dense["status"] == "ok" and dense["chunks_tried"]["160"] == "out of memory" and dense["chunk"] == 80
    assert sala["speedup_vs_dense"] > 0 and sala["decode_ms_per_token"] > 0
    assert saved["runs"]["sala"]["warm_up_seconds"] > 0  # kernels compiled before anything is timed
