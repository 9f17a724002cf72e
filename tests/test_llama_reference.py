"""The engine's Llama equals an independent implementation (transformers) of the same network."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

SAMPLE = (
    "The harbour light of Varna Point was built in 1871 by the stonemason Ilse Marten and her two brothers. "
    "It stands on a granite shelf at the northern end of the bay, forty-two metres above the sea."
)


def test_default_model_logits_equal_transformers_on_the_same_gguf(smollm2, smollm2_path):
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    ).eval()
    ids = smollm2.tokenizer.encode_chat([{"role": "user", "content": SAMPLE * 2}])
    assert len(ids) >= 64
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    ours = smollm2.model(torch.tensor(ids), smollm2.new_cache())
    diff = (ours - expected).abs().max().item()
    assert diff < 1e-3, f"max abs logit difference {diff}"
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))


def _tiny_llama_gguf(path, qtype_name: str, seed: int = 0):
    """Write a tiny random Llama as GGUF the way llama.cpp's converter does (q/k rows permuted)."""
    import gguf

    rng = np.random.default_rng(seed)
    hidden, heads, kv, ffn, vocab, layers = 64, 4, 2, 96, 300, 2
    head_dim = hidden // heads
    hf = {}
    hf["model.embed_tokens.weight"] = rng.standard_normal((vocab, hidden)).astype(np.float32) * 0.5
    hf["model.norm.weight"] = 1 + 0.1 * rng.standard_normal(hidden).astype(np.float32)
    hf["lm_head.weight"] = rng.standard_normal((vocab, hidden)).astype(np.float32) * 0.1
    for i in range(layers):
        p = f"model.layers.{i}."
        hf[p + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(hidden).astype(np.float32)
        hf[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(hidden).astype(np.float32)
        for name, shape in [
            ("self_attn.q_proj", (heads * head_dim, hidden)), ("self_attn.k_proj", (kv * head_dim, hidden)),
            ("self_attn.v_proj", (kv * head_dim, hidden)), ("self_attn.o_proj", (hidden, hidden)),
            ("mlp.gate_proj", (ffn, hidden)), ("mlp.up_proj", (ffn, hidden)), ("mlp.down_proj", (hidden, ffn)),
        ]:
            hf[p + name + ".weight"] = rng.standard_normal(shape).astype(np.float32) * 0.2

    def permute(w, n_head):  # llama.cpp convert_hf_to_gguf.py's permutation, written from its description
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    short = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    tokens = [f"t{i}" for i in range(vocab)]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([])
    writer.add_token_types([1] * vocab)
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    dequantised = {}
    for name, w in hf.items():
        stored = w
        if name.endswith("q_proj.weight"):
            stored = permute(w, heads)
        elif name.endswith("k_proj.weight"):
            stored = permute(w, kv)
        if name in names:
            gname = names[name]
        else:
            i, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            gname = f"blk.{i}.{short[rest]}.weight"
        if w.ndim == 2 and qtype_name != "F32":
            q = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=qtype)
            back = gguf.quants.dequantize(q, qtype).astype(np.float32)
            # undo the permutation on what the file really holds, to feed the reference HF names
            if name.endswith("q_proj.weight"):
                back = back.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
            elif name.endswith("k_proj.weight"):
                back = back.reshape(kv, w.shape[0] // kv // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
            dequantised[name] = back
        else:
            writer.add_tensor(gname, stored)
            dequantised[name] = w
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=256, tie_word_embeddings=False,
    )
    return config, dequantised


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_types_dequantise_and_unpermute_to_the_reference_network(tmp_path, qtype):
    from salachat.engine.loader import load_model

    path = tmp_path / f"tiny-{qtype}.gguf"
    config, weights = _tiny_llama_gguf(path, qtype)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    loaded = load_model(str(path), device="cpu", dtype=torch.float32)
    ids = torch.arange(0, 300, 3)[:80]
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    ours = loaded.model(ids, loaded.new_cache())
    assert (ours - expected).abs().max().item() < 1e-4


def test_hf_folder_llama_equals_transformers(tmp_path):
    """A Llama checkpoint saved by transformers (config.json + safetensors) loads and computes the same."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from sala_tiny import _write_tokenizer
    from salachat.engine.loader import load_model

    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path, safe_serialization=True)
    _write_tokenizer(tmp_path, 320)
    loaded = load_model(str(tmp_path), device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 320, (90,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    assert (loaded.model(ids, loaded.new_cache()) - expected).abs().max().item() < 1e-4
    assert loaded.family == "llama" and loaded.tokenizer.chat_template
