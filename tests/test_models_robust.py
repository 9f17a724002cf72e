"""Broken model files and folders are refused with one line (ModelLoadError), never another exception, a hang
or a huge allocation: a generated corpus of malformed GGUF files and HF folders, in process, and a few of
them through the real `salachat ask` (exit 4, one line, no traceback)."""

import json
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from salachat.engine.loader import ModelLoadError, inspect_model, load_model, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
HIDDEN, HEADS, KV, FFN, VOCAB, LAYERS = 64, 4, 2, 64, 64, 1
SKIP = object()


def _meta():
    return {
        "general.architecture": ("str", "llama"),
        "llama.block_count": ("u32", LAYERS),
        "llama.context_length": ("u32", 128),
        "llama.embedding_length": ("u32", HIDDEN),
        "llama.feed_forward_length": ("u32", FFN),
        "llama.attention.head_count": ("u32", HEADS),
        "llama.attention.head_count_kv": ("u32", KV),
        "llama.attention.layer_norm_rms_epsilon": ("f32", 1e-5),
        "tokenizer.ggml.model": ("str", "gpt2"),
        "tokenizer.ggml.tokens": ("strs", [f"t{i}" for i in range(VOCAB)]),
        "tokenizer.ggml.merges": ("strs", []),
        "tokenizer.ggml.token_type": ("i32s", [1] * VOCAB),
    }


def _tensors():
    rng = np.random.default_rng(0)
    head_dim = HIDDEN // HEADS
    out = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,), "output.weight": (VOCAB, HIDDEN)}
    for name, shape in [("attn_norm", (HIDDEN,)), ("ffn_norm", (HIDDEN,)), ("attn_q", (HIDDEN, HIDDEN)),
                        ("attn_k", (KV * head_dim, HIDDEN)), ("attn_v", (KV * head_dim, HIDDEN)),
                        ("attn_output", (HIDDEN, HIDDEN)), ("ffn_gate", (FFN, HIDDEN)), ("ffn_up", (FFN, HIDDEN)),
                        ("ffn_down", (HIDDEN, FFN))]:
        out[f"blk.0.{name}.weight"] = shape
    return {k: rng.standard_normal(s).astype(np.float32) * 0.1 for k, s in out.items()}


def write_gguf(path: Path, meta_changes=None, tensor_changes=None) -> Path:
    """A tiny valid llama GGUF (by gguf's writer) with metadata or tensors changed, SKIP to leave one out."""
    meta = _meta()
    meta.update(meta_changes or {})
    tensors = _tensors()
    tensors.update(tensor_changes or {})
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.kv_data[0].clear()  # the writer adds general.architecture itself: we decide
    adders = {"str": writer.add_string, "u32": writer.add_uint32, "i32": writer.add_int32,
              "f32": writer.add_float32, "strs": writer.add_array, "i32s": writer.add_array,
              "u64": writer.add_uint64, "arr": writer.add_array}
    for key, value in meta.items():
        if value is SKIP:
            continue
        kind, v = value
        adders[kind](key, v)
    for name, array in tensors.items():
        if array is not SKIP:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def raw_gguf(path: Path, body: bytes, n_tensors=0, n_kv=1, version=3) -> Path:
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + body)
    return path


def nested_arrays(depth: int) -> bytes:
    value = struct.pack("<IQ", 4, 0)  # innermost: an empty uint32 array
    for _ in range(depth):
        value = struct.pack("<IQ", 9, 1) + value
    return _string(b"deep.key") + struct.pack("<I", 9) + value


def gguf_corpus(tmp: Path) -> dict[str, Path]:
    ok = write_gguf(tmp / "valid.gguf")
    data = ok.read_bytes()
    corpus = {}

    def raw(name, content: bytes):
        (tmp / name).write_bytes(content)
        corpus[name] = tmp / name

    def variant(name, meta=None, tensors=None):
        corpus[name] = write_gguf(tmp / name, meta, tensors)

    raw("empty.gguf", b"")
    raw("magic-only.gguf", b"GGUF")
    raw("text.gguf", b"this is not a model\n" * 10)
    raw("version-99.gguf", data[:4] + struct.pack("<I", 99) + data[8:])
    for fraction in (0.02, 0.2, 0.5, 0.9, 0.999):
        raw(f"truncated-{fraction}.gguf", data[: int(len(data) * fraction)])
    corpus["kv-count-huge.gguf"] = raw_gguf(tmp / "kv-count-huge.gguf", b"", n_kv=1 << 62)
    corpus["tensor-count-huge.gguf"] = raw_gguf(tmp / "tensor-count-huge.gguf", b"", n_tensors=1 << 62, n_kv=0)
    corpus["string-huge.gguf"] = raw_gguf(tmp / "string-huge.gguf", struct.pack("<Q", 1 << 60) + b"k")
    corpus["array-huge.gguf"] = raw_gguf(
        tmp / "array-huge.gguf", _string(b"a") + struct.pack("<IIQ", 9, 4, 1 << 61))
    corpus["array-of-strings-huge.gguf"] = raw_gguf(
        tmp / "array-of-strings-huge.gguf", _string(b"a") + struct.pack("<IIQ", 9, 8, 1 << 61))
    corpus["nested-arrays.gguf"] = raw_gguf(tmp / "nested-arrays.gguf", nested_arrays(5000))
    corpus["unknown-value-type.gguf"] = raw_gguf(tmp / "unknown-value-type.gguf", _string(b"k") + struct.pack("<I", 77))
    tensor_info = _string(b"token_embd.weight") + struct.pack("<I", 2)
    corpus["tensor-dims-absurd.gguf"] = raw_gguf(
        tmp / "tensor-dims-absurd.gguf", tensor_info + struct.pack("<QQIQ", 1 << 40, 1 << 40, 0, 0),
        n_tensors=1, n_kv=0)
    corpus["tensor-dims-zero.gguf"] = raw_gguf(
        tmp / "tensor-dims-zero.gguf", tensor_info + struct.pack("<QQIQ", 0, 64, 0, 0), n_tensors=1, n_kv=0)
    corpus["tensor-type-unknown.gguf"] = raw_gguf(
        tmp / "tensor-type-unknown.gguf", tensor_info + struct.pack("<QQIQ", 64, 64, 999, 0), n_tensors=1, n_kv=0)
    corpus["tensor-many-dims.gguf"] = raw_gguf(
        tmp / "tensor-many-dims.gguf", _string(b"t") + struct.pack("<I", 50) + b"\0" * 400, n_tensors=1, n_kv=0)
    variant("no-architecture.gguf", {"general.architecture": SKIP})
    variant("architecture-gpt9.gguf", {"general.architecture": ("str", "gpt9")})
    variant("architecture-number.gguf", {"general.architecture": ("u32", 7)})
    variant("no-embedding-length.gguf", {"llama.embedding_length": SKIP})
    variant("no-block-count.gguf", {"llama.block_count": SKIP})
    variant("heads-zero.gguf", {"llama.attention.head_count": ("u32", 0)})
    variant("heads-negative.gguf", {"llama.attention.head_count": ("i32", -4)})
    variant("kv-heads-zero.gguf", {"llama.attention.head_count_kv": ("u32", 0)})
    variant("kv-heads-not-dividing.gguf", {"llama.attention.head_count_kv": ("u32", 3)})
    variant("heads-not-dividing-hidden.gguf", {"llama.attention.head_count": ("u32", 3)})
    variant("heads-a-string.gguf", {"llama.attention.head_count": ("str", "four")})
    variant("heads-an-array.gguf", {"llama.attention.head_count": ("arr", [4, 4])})
    variant("layers-absurd.gguf", {"llama.block_count": ("u32", 4_000_000_000)})
    variant("hidden-absurd.gguf", {"llama.embedding_length": ("u64", 1 << 40)})
    variant("eps-negative.gguf", {"llama.attention.layer_norm_rms_epsilon": ("f32", -1.0)})
    variant("no-tokenizer-model.gguf", {"tokenizer.ggml.model": SKIP})
    variant("tokenizer-unknown.gguf", {"tokenizer.ggml.model": ("str", "wordpiece9")})
    variant("no-tokens.gguf", {"tokenizer.ggml.tokens": SKIP})
    variant("tokens-numbers.gguf", {"tokenizer.ggml.tokens": ("arr", list(range(VOCAB)))})
    variant("merges-malformed.gguf", {"tokenizer.ggml.merges": ("strs", ["nospace"])})
    variant("token-types-short.gguf", {"tokenizer.ggml.token_type": ("i32s", [1, 1])})
    variant("pre-tokenizer-unknown.gguf", {"tokenizer.ggml.pre": ("str", "klingon")})
    variant("alignment-zero.gguf", {"general.alignment": ("u32", 0)})
    variant("missing-tensor.gguf", tensors={"blk.0.ffn_up.weight": SKIP})
    variant("wrong-shape.gguf", tensors={"blk.0.ffn_up.weight": np.zeros((FFN + 1, HIDDEN), np.float32)})
    variant("rope-freqs-negative.gguf", tensors={"rope_freqs.weight": -np.ones(HIDDEN // HEADS // 2, np.float32)})
    variant("rope-freqs-wrong-size.gguf", tensors={"rope_freqs.weight": np.ones(3, np.float32)})
    return corpus


def _write_safetensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def hf_corpus(tmp: Path) -> dict[str, Path]:
    sys.path.insert(0, str(Path(__file__).parent))
    from sala_tiny import _write_tokenizer

    config = {"model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": 1,
              "num_attention_heads": HEADS, "num_key_value_heads": KV, "vocab_size": 320}
    weights = {"model.embed_tokens.weight": torch.zeros(320, HIDDEN)}
    corpus = {}

    def folder(name, config_text=None, files=None, tokenizer=True, safetensors=True):
        path = tmp / name
        path.mkdir()
        if config_text is not None:
            (path / "config.json").write_bytes(config_text if isinstance(config_text, bytes) else config_text.encode())
        if tokenizer:
            _write_tokenizer(path, 320)
        if safetensors:
            _write_safetensors(path / "model.safetensors", weights)
        for file_name, content in (files or {}).items():
            (path / file_name).write_bytes(content if isinstance(content, bytes) else content.encode())
        corpus[name] = path

    good = json.dumps(config)
    folder("no-config", None)
    folder("config-not-json", "{model_type: llama")
    folder("config-a-list", "[1, 2, 3]")
    folder("config-a-string", '"llama"')
    folder("config-not-utf8", b"\xff\xfe\x00{")
    folder("config-empty", "")
    folder("no-model-type", json.dumps({k: v for k, v in config.items() if k != "model_type"}))
    folder("model-type-a-list", json.dumps({**config, "model_type": ["llama"]}))
    folder("heads-zero", json.dumps({**config, "num_attention_heads": 0}))
    folder("heads-negative", json.dumps({**config, "num_attention_heads": -4}))
    folder("heads-a-string", json.dumps({**config, "num_attention_heads": "4"}))
    folder("heads-not-dividing", json.dumps({**config, "num_key_value_heads": 3}))
    folder("hidden-absurd", json.dumps({**config, "hidden_size": 10**12}))
    folder("hidden-a-float", json.dumps({**config, "hidden_size": 64.5}))
    folder("layers-a-dict", json.dumps({**config, "num_hidden_layers": {"n": 1}}))
    folder("rope-yarn", json.dumps({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    folder("rope-a-list", json.dumps({**config, "rope_scaling": [1, 2]}))
    folder("rope-llama3-incomplete", json.dumps({**config, "rope_scaling": {"rope_type": "llama3", "factor": 8}}))
    folder("nested-eos", json.dumps({**config, "eos_token_id": [[1, [2]]]}))
    folder("no-weights", good, safetensors=False)
    folder("weights-garbage", good, safetensors=False, files={"model.safetensors": b"\x10\x00" * 100})
    folder("weights-header-huge", good, safetensors=False,
           files={"model.safetensors": struct.pack("<Q", 1 << 50) + b"{}"})
    folder("index-not-json", good, safetensors=False, files={"model.safetensors.index.json": "nope"})
    folder("index-missing-shard", good, safetensors=False,
           files={"model.safetensors.index.json": json.dumps({"weight_map": {"a": "model-00001.safetensors"}})})
    folder("index-a-list", good, safetensors=False, files={"model.safetensors.index.json": "[]"})
    folder("no-tokenizer", good, tokenizer=False)
    folder("tokenizer-not-json", good, tokenizer=False, files={"tokenizer.json": "{{{"})
    folder("tokenizer-wrong-shape", good, tokenizer=False, files={"tokenizer.json": json.dumps({"model": 3})})
    folder("tokenizer-config-a-list", good, files={"tokenizer_config.json": "[1]"})
    folder("tokenizer-config-not-json", good, files={"tokenizer_config.json": "{"})
    folder("missing-tensors", good)  # valid files, but the weights lack most of the network
    truncated = tmp / "truncated-weights"
    truncated.mkdir()
    (truncated / "config.json").write_text(good)
    _write_tokenizer(truncated, 320)
    _write_safetensors(truncated / "model.safetensors", weights)
    whole = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(whole[: len(whole) // 2])
    corpus["truncated-weights"] = truncated
    return corpus


def _expect_one_line_refusal(call, path):
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        call(path)
    message = str(info.value)
    assert message and "\n" not in message and len(message) < 600, (path.name, message)
    assert time.perf_counter() - start < 20, path.name
    return message


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_the_valid_files_of_the_corpus_load(tmp_path):
    """The corpus is broken by one change each: the unchanged file loads."""
    loaded = load_model(write_gguf(tmp_path / "valid.gguf"), device="cpu")
    assert loaded.model(torch.tensor([1, 2, 3]), loaded.new_cache()).shape == (3, VOCAB)


def test_malformed_gguf_files_are_refused_in_one_line(tmp_path):
    corpus = gguf_corpus(tmp_path)
    assert len(corpus) >= 40
    before = _peak_rss_mb()
    for name, path in corpus.items():
        _expect_one_line_refusal(lambda p: load_model(p, device="cpu"), path)
        if name != "rope-freqs-negative.gguf":  # values, not the header: found when loading
            _expect_one_line_refusal(inspect_model, path)
        if name not in _TOKENIZER_FINE:
            _expect_one_line_refusal(load_tokenizer, path)
    assert _peak_rss_mb() - before < 500, "a malformed file made the loader allocate"


# files whose tokenizer and header are fine (only the weights or model metadata are broken)
_TOKENIZER_FINE = {"missing-tensor.gguf", "wrong-shape.gguf", "rope-freqs-negative.gguf",
                   "rope-freqs-wrong-size.gguf", "no-embedding-length.gguf", "no-block-count.gguf",
                   "heads-zero.gguf", "heads-negative.gguf", "kv-heads-zero.gguf", "kv-heads-not-dividing.gguf",
                   "heads-not-dividing-hidden.gguf", "heads-a-string.gguf", "heads-an-array.gguf",
                   "layers-absurd.gguf", "hidden-absurd.gguf", "eps-negative.gguf"}


def test_malformed_hf_folders_are_refused_in_one_line(tmp_path):
    corpus = hf_corpus(tmp_path)
    assert len(corpus) >= 30
    for path in corpus.values():
        _expect_one_line_refusal(lambda p: load_model(p, device="cpu"), path)


@pytest.mark.parametrize("name", ["truncated-0.5.gguf", "nested-arrays.gguf", "heads-zero.gguf"])
def test_salachat_ask_refuses_a_broken_model_with_exit_4(tmp_path, name):
    (tmp_path / "corpus").mkdir()
    path = gguf_corpus(tmp_path / "corpus")[name]
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "salachat"), "ask", "--model", str(path), str(ROOT / "assets" / "sample.pdf"),
         "q"], check=False, capture_output=True, text=True, timeout=300,
        env={"SALACHAT_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_salachat_ask_refuses_a_config_that_is_a_list_with_exit_4(tmp_path):
    folder = hf_corpus(tmp_path)["config-a-list"]
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "salachat"), "ask", "--model", str(folder), str(ROOT / "assets" / "sample.pdf"),
         "q"], check=False, capture_output=True, text=True, timeout=300,
        env={"SALACHAT_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
