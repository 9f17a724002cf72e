"""Each family computes what transformers computes with the same weights: Llama 3.x (llama3 RoPE scaling),
Qwen2 (attention biases), Qwen3 (q/k norms), from an HF safetensors folder and from a GGUF file written with
the gguf package, dequantised and kept quantised."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).parent))
from sala_tiny import _write_tokenizer
from salachat.engine.loader import load_model

VOCAB, HIDDEN, HEADS, KV, HEAD_DIM, FFN, LAYERS = 320, 64, 4, 2, 32, 128, 2
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def reference_config(family: str):
    common = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": FFN,
              "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV,
              "head_dim": HEAD_DIM, "rms_norm_eps": 1e-5, "max_position_embeddings": 512,
              "tie_word_embeddings": False}
    if family == "llama3":
        return transformers.LlamaConfig(**common, rope_parameters={"rope_theta": 10000.0, **LLAMA3})
    if family == "qwen2":
        return transformers.Qwen2Config(**common, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    return transformers.Qwen3Config(**common, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})


def reference_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    cls = {"llama3": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "qwen3": transformers.Qwen3ForCausalLM}[family]
    model = cls(reference_config(family)).eval()
    with torch.no_grad():  # norms and biases away from their init values, so that a missing one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids[None]).logits[0]


IDS = torch.randint(0, VOCAB, (100,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3"])
def test_hf_folder_equals_transformers(tmp_path, family):
    reference = reference_model(family)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    _write_tokenizer(tmp_path, VOCAB)
    loaded = load_model(tmp_path, device="cpu", dtype=torch.float32)
    ours = loaded.model(IDS, loaded.new_cache())
    assert (ours - logits(reference, IDS)).abs().max().item() < 1e-4
    assert loaded.architecture == {"llama3": "llama"}.get(family, family)


def test_llama3_scaling_is_not_a_no_op(tmp_path):
    """The same weights without the scaling compute something else: the test above would catch its loss."""
    scaled = reference_model("llama3")
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{k: v for k, v in reference_config("llama3").to_dict().items() if k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings")})).eval()
    plain.load_state_dict(scaled.state_dict())
    assert (logits(plain, IDS) - logits(scaled, IDS)).abs().max().item() > 1e-3  # 10x the tolerance above


SHORT = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}


def gguf_name(hf: str) -> str:
    if hf in TOP:
        return TOP[hf]
    parts = hf.split(".")
    return f"blk.{parts[2]}.{SHORT['.'.join(parts[3:-1])]}.{parts[-1]}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's q/k row permutation for the llama architecture, written from its description."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors() -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for llama3 scaling, written from its description."""
    inv = 1.0 / (10000.0 ** (np.arange(0, HEAD_DIM, 2, dtype=np.float64) / HEAD_DIM))
    old, low, high, factor = 64, 1.0, 4.0, 8.0
    factors = []
    for freq in inv:
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(path, family: str, qtype_name: str, seed: int = 0):
    """A tiny checkpoint as llama.cpp's converter writes it; returns transformers fed what the file holds."""
    reference = reference_model(family, seed)
    arch = "llama" if family == "llama3" else family
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if arch != "llama" else "llama-bpe")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    writer.add_token_merges([])
    writer.add_token_types([1] * VOCAB)
    if family == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors())
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    held = {}
    for name, tensor in reference.state_dict().items():
        w = tensor.numpy().astype(np.float32)
        heads = HEADS if "q_proj.weight" in name else KV if "k_proj.weight" in name else 0
        stored = llama_cpp_permute(w, heads) if arch == "llama" and heads else w
        if w.ndim == 2 and qtype_name != "F32":
            q = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(gguf_name(name), q, raw_shape=q.shape, raw_dtype=qtype)
            back = gguf.quants.dequantize(q, qtype).astype(np.float32)
            if arch == "llama" and heads:  # the inverse permutation, by its definition
                back = back.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
            held[name] = torch.from_numpy(back)
        else:
            writer.add_tensor(gguf_name(name), stored)
            held[name] = tensor
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reference.load_state_dict(held)
    return reference


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3"])
@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_1"])
def test_gguf_dequantised_equals_transformers(tmp_path, family, qtype):
    reference = write_gguf(tmp_path / "m.gguf", family, qtype)
    loaded = load_model(tmp_path / "m.gguf", device="cpu", dtype=torch.float32)
    ours = loaded.model(IDS, loaded.new_cache())
    assert (ours - logits(reference, IDS)).abs().max().item() < 1e-4


def rel_rms(a, b):
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3"])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_kept_quantised_follows_transformers(tmp_path, family, qtype):
    """Packed weights (bf16 activations into the int4 kernel): within bf16 rounding of the exact network, for
    a prompt (the dense path) and token by token (the packed kernel)."""
    from salachat.engine.qlinear import QuantLinear

    reference = write_gguf(tmp_path / "m.gguf", family, qtype)
    loaded = load_model(tmp_path / "m.gguf", device="cpu")
    assert any(isinstance(m, QuantLinear) for m in loaded.model.modules())
    expected = logits(reference, IDS)
    assert rel_rms(loaded.model(IDS, loaded.new_cache()), expected) < 0.03
    cache = loaded.new_cache()
    from salachat.engine.qlinear import KV_DTYPE

    assert KV_DTYPE in (torch.bfloat16, torch.float16)
    assert cache.layers[0].keys.dtype == KV_DTYPE  # K/V kept in 16 bits (the CPU's choice) under fp32 activations
    loaded.model(IDS[:90], cache)
    steps = torch.cat([loaded.model(IDS[i : i + 1], cache) for i in range(90, 100)])
    assert rel_rms(steps, expected[90:]) < 0.03


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_packed_matmul_equals_its_reference(qtype):
    """QuantLinear, both paths, against dequantising the GGUF blocks by gguf's own code."""
    from salachat.engine.gguf_file import TensorInfo
    from salachat.engine.qlinear import QuantEmbedding, QuantLinear, dequantize_reference

    rng = np.random.default_rng(0)
    w = rng.standard_normal((192, 96)).astype(np.float32)
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    raw = gguf.quants.quantize(w, kind)
    exact = torch.from_numpy(gguf.quants.dequantize(raw, kind).astype(np.float32))
    assert torch.equal(dequantize_reference(torch.from_numpy(raw), qtype), exact)
    layer = QuantLinear.from_gguf(torch.from_numpy(raw), TensorInfo("w", (192, 96), kind, 0))
    # exact: scales rounded to bf16 scaled whole groups alike, and the default model's answer to the sample
    # question became a copy of its prompt
    assert torch.equal(layer.dequantized(torch.float32), exact)
    for rows in (1, 3, 40):
        x = torch.from_numpy(rng.standard_normal((rows, 96)).astype(np.float32))
        assert rel_rms(layer(x), x @ exact.T) < 0.01, rows
    # rows read back one by one, and the top entries of a kernel output recomputed from them in fp32
    index = torch.tensor([0, 31, 32, 63, 64, 100, 191])
    assert torch.equal(layer.rows(index), exact[index])
    # an embedding tied to the layer reads its rows from the packs; one of its own from the blocks
    ids = index.view(1, -1).repeat(2, 1)
    assert torch.equal(QuantEmbedding.tied(layer)(ids), exact[ids])
    assert torch.equal(QuantEmbedding(torch.from_numpy(raw), qtype, 96)(ids), exact[ids])
    x = torch.from_numpy(rng.standard_normal((2, 96)).astype(np.float32))
    refined, kernel = layer.refine_top(x, layer(x), k=8), layer(x).float()
    top = kernel.topk(8, dim=-1).indices
    want = (x @ exact.T).gather(-1, top)
    assert torch.allclose(refined.gather(-1, top), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(kernel.gather(-1, top), want, rtol=1e-5, atol=1e-5)  # bf16: off by more
    rest = torch.ones_like(kernel, dtype=torch.bool).scatter(-1, top, False)
    assert torch.equal(refined[rest], kernel[rest])


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_dequantised_by_slabs_is_exact_across_slab_edges(qtype, monkeypatch):
    """`dequantized` computes a slab of rows at a time: rows 0..447 in slabs of 128 (the last one short) give
    the file's exact weights, and in bf16 those weights rounded once."""
    from salachat.engine import qlinear
    from salachat.engine.gguf_file import TensorInfo

    monkeypatch.setattr(qlinear, "DEQUANT_SLAB", 128 * 160)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((448, 160)).astype(np.float32) * rng.uniform(0.01, 3, (448, 1)).astype(np.float32)
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    raw = gguf.quants.quantize(w, kind)
    exact = torch.from_numpy(gguf.quants.dequantize(raw, kind).astype(np.float32))
    layer = qlinear.QuantLinear.from_gguf(torch.from_numpy(raw), TensorInfo("w", (448, 160), kind, 0))
    assert torch.equal(layer.dequantized(torch.float32), exact)
    assert torch.equal(layer.dequantized(), exact.to(torch.bfloat16))


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3"])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_packed_decode_step_has_the_generic_forwards_bits(tmp_path, family, qtype, monkeypatch):
    """A packed model's CPU decode step (`Block.decode_packed`, taken where every block fits it: no biases,
    no q/k norms) gives the logits of the modules' own forward, token after token: exactly where the matmuls
    take fp32 inputs; within rounding where the integer kernel rounds them to 8 bits, as it then takes the
    norms and SiLU inside the kernel (their fp32 results can differ in the last bit from torch's, and a
    last bit can move an 8-bit input by one step; the kernel against its unfused self: test_packed_gemv)."""
    from salachat.engine.models import llama

    write_gguf(tmp_path / "m.gguf", family, qtype)
    loaded = load_model(tmp_path / "m.gguf", device="cpu")
    model = loaded.model
    model.fused_decode = False  # the layers' own step (the fused one against it: test_cpu_decode_step)
    runs = {}
    for name in ("fast", "generic"):
        if name == "generic":
            monkeypatch.setattr(llama.LlamaForCausalLM, "_packed_decode", lambda self, cache: False)
        cache = loaded.new_cache()
        model(IDS[:90], cache)
        if name == "fast":
            assert model._packed_decode(cache) == (family == "llama3")
        runs[name] = torch.cat([model(IDS[i : i + 1], cache) for i in range(90, 100)])
    from salachat.engine.qlinear import QuantLinear
    from salachat.kernels import packed_gemv

    if any(packed_gemv.rounds_activations(m) for m in model.modules() if isinstance(m, QuantLinear)):
        scale = runs["generic"].abs().max()
        assert (runs["fast"] - runs["generic"]).abs().max() < 1e-4 * scale  # seen: 2e-7, or the same bits
        assert torch.equal(runs["fast"].argmax(-1), runs["generic"].argmax(-1))
    else:
        assert torch.equal(runs["fast"], runs["generic"])


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_packed_layers_share_one_block_and_hold_each_tensor_built_alone(tmp_path, family, qtype):
    """The loader builds every packed layer in one arena, q/k/v and gate/up side by side: each holds exactly
    what its tensors give built one by one (packs, GGUF's numbers, the kernel's scales, the weights, biases),
    and a model whose layers own copies of those buffers computes the same bits."""
    from salachat.engine.gguf_file import GGUFFile
    from salachat.engine.models.llama import LlamaArgs, LlamaForCausalLM
    from salachat.engine.qlinear import QuantLinear

    write_gguf(tmp_path / "m.gguf", family, qtype)
    loaded = load_model(tmp_path / "m.gguf", device="cpu")
    model = loaded.model
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 1 + 4 * LAYERS  # the LM head; per block q/k/v, o, gate/up, down
    block = layers[0].packed0.untyped_storage()
    assert all(b.untyped_storage().data_ptr() == block.data_ptr() for m in layers for b in m.buffers())
    spans = sorted((b.data_ptr(), b.data_ptr() + b.nbytes) for m in layers for b in m.buffers())
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no two views overlap

    gguf_file = GGUFFile.open(tmp_path / "m.gguf")
    config = gguf_file.hf_config()
    with torch.device("meta"):
        names = list(LlamaForCausalLM(LlamaArgs.from_config(config)).state_dict())
    raw = gguf_file.tensors(names, LAYERS, keep=QuantLinear.fits)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    for fused, parts in ((attn.q_proj, ("q_proj", "k_proj", "v_proj")), (mlp.gate_proj, ("gate_proj", "up_proj"))):
        owner = "self_attn" if fused is attn.q_proj else "mlp"
        alone = [QuantLinear.from_gguf(*raw[f"model.layers.1.{owner}.{p}.weight"]) for p in parts]
        for name, buffer in fused.named_buffers():
            dim = 0 if name.startswith("packed") else 1
            assert torch.equal(buffer, torch.cat([getattr(a, name) for a in alone], dim=dim)), name
        assert torch.equal(fused.dequantized(torch.float32), torch.cat([a.dequantized(torch.float32) for a in alone]))
    if family == "qwen2":
        biases = [raw[f"model.layers.1.self_attn.{p}.bias"] for p in ("q_proj", "k_proj", "v_proj")]
        assert torch.equal(attn.q_proj.bias, torch.cat(biases))

    cache = loaded.new_cache()
    before = torch.cat([model(IDS[:90], cache), *[model(IDS[i : i + 1], cache) for i in range(90, 100)]])
    for layer in layers:
        for name, buffer in list(layer.named_buffers()):
            setattr(layer, name, buffer.clone())
    cache = loaded.new_cache()
    after = torch.cat([model(IDS[:90], cache), *[model(IDS[i : i + 1], cache) for i in range(90, 100)]])
    assert torch.equal(before, after)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_weights_are_exact_where_scaled_scales_overflow_fp16(qtype):
    """Only GGUF's own fp16 numbers are kept; a pack's scale and offset are powers of two times them, in fp32:
    with d near fp16's largest values 16 d and -128 d overflow fp16 and the weights must still be the file's."""
    from salachat.engine.gguf_file import TensorInfo
    from salachat.engine.qlinear import QuantLinear

    rng = np.random.default_rng(2)
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    w = rng.standard_normal((128, 64)).astype(np.float32)
    raw = gguf.quants.quantize(w, kind).copy()
    d = raw.reshape(128, 2, -1)[..., 0:2].copy().view(np.float16)
    d[::2] = (60000 * np.sign(d[::2].astype(np.float32))).astype(np.float16)  # every other row's d near fp16's top
    raw.reshape(128, 2, -1)[..., 0:2] = d.view(np.uint8)
    exact = torch.from_numpy(gguf.quants.dequantize(raw, kind).astype(np.float32))
    assert exact.abs().max() > 65504
    layer = QuantLinear.from_gguf(torch.from_numpy(raw), TensorInfo("w", (128, 64), kind, 0))
    assert torch.equal(layer.dequantized(torch.float32), exact)
    index = torch.tensor([0, 1, 33, 64, 127])
    assert torch.equal(layer.rows(index), exact[index])


@pytest.mark.parametrize("prefill_dtype", [torch.bfloat16, torch.float32])
def test_a_prompts_matmul_in_either_dtype_follows_the_files_weights(prefill_dtype, monkeypatch):
    """A prompt's rows take a dense matmul in bf16 where the CPU computes in it and in fp32 elsewhere
    (`qlinear.PREFILL_DTYPE`): either way the result is the file's weights times x, in x's dtype."""
    from salachat.engine import qlinear
    from salachat.engine.gguf_file import TensorInfo

    monkeypatch.setattr(qlinear, "PREFILL_DTYPE", prefill_dtype)
    rng = np.random.default_rng(4)
    w = rng.standard_normal((128, 96)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1)
    exact = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1).astype(np.float32))
    layer = qlinear.QuantLinear.from_gguf(torch.from_numpy(raw), TensorInfo("w", (128, 96), gguf.GGMLQuantizationType.Q4_1, 0))
    x = torch.from_numpy(rng.standard_normal((40, 96)).astype(np.float32))
    y = layer(x)
    assert y.dtype == torch.float32
    assert rel_rms(y, x @ exact.T) < (1e-2 if prefill_dtype == torch.bfloat16 else 1e-6)
