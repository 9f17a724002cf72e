"""Model names resolve the way users have their models: salachat's folder, the Hugging Face hub cache (refs →
snapshot, HF_HUB_CACHE / HF_HOME / the default folder), LM Studio's and Ollama's folders; no network."""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from salachat.engine.loader import ModelLoadError
from test_models_robust import write_gguf

from salachat import models

COMMIT_OLD, COMMIT_NEW = "a" * 40, "b" * 40


def hf_cache_repo(cache: Path, repo: str, files: dict[str, Path], commit: str = COMMIT_NEW) -> Path:
    """The layout huggingface_hub writes: blobs by hash, snapshots/<commit>/<file> symlinks, refs/main."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        data = source.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(Path(name).parts) + 1)) / "blobs" / blob.name)
    (root / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    (tmp_path / "src").mkdir()
    return write_gguf(tmp_path / "src" / "tiny.gguf")


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    import torch
    import transformers
    from sala_tiny import _write_tokenizer

    folder = tmp_path / "hf-src"
    config = transformers.Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    _write_tokenizer(folder, 320)
    return folder


def test_org_name_resolves_to_the_snapshot_refs_main_names(tmp_path, monkeypatch, hf_folder):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    files = {p.name: p for p in hf_folder.iterdir()}
    hf_cache_repo(cache, "acme/tiny-qwen", files, COMMIT_OLD)
    new = hf_cache_repo(cache, "acme/tiny-qwen", files, COMMIT_NEW)
    assert models.resolve("acme/tiny-qwen") == new
    loaded = models.open_model("acme/tiny-qwen", device="cpu")
    assert loaded.model_id == "acme/tiny-qwen" and loaded.architecture == "qwen2"


def test_hf_home_and_the_default_folder(tmp_path, monkeypatch, tiny_gguf):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    snapshot = hf_cache_repo(tmp_path / "hf-home" / "hub", "acme/tiny-GGUF", {"tiny.Q8_0.gguf": tiny_gguf})
    assert models.resolve("acme/tiny-GGUF") == snapshot / "tiny.Q8_0.gguf"  # the only GGUF file
    assert models.resolve("acme/tiny-GGUF:tiny.Q8_0.gguf") == snapshot / "tiny.Q8_0.gguf"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    snapshot = hf_cache_repo(tmp_path / "user" / ".cache" / "huggingface" / "hub", "acme/other", {"a.gguf": tiny_gguf})
    assert models.resolve("acme/other:a.gguf") == snapshot / "a.gguf"


def test_several_gguf_files_need_a_file_name(tmp_path, monkeypatch, tiny_gguf):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    hf_cache_repo(tmp_path / "hub", "acme/tiny-GGUF", {"tiny.Q8_0.gguf": tiny_gguf, "tiny.Q4_1.gguf": tiny_gguf})
    with pytest.raises(ModelLoadError, match=r"tiny.Q4_1.gguf, tiny.Q8_0.gguf.*acme/tiny-GGUF:FILE.gguf"):
        models.resolve("acme/tiny-GGUF")
    with pytest.raises(ModelLoadError, match="no file 'tiny.F16.gguf'"):
        models.resolve("acme/tiny-GGUF:tiny.F16.gguf")


def test_a_repo_not_in_the_cache_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="huggingface-cli download meta-llama/Llama-3.2-1B"):
        models.resolve("meta-llama/Llama-3.2-1B")
    with pytest.raises(ModelLoadError, match="not installed: run `salachat models pull smollm2`"):
        models.resolve("smollm2")
    with pytest.raises(ModelLoadError, match="neither a known model"):
        models.resolve("./no/such/file.gguf")


def test_list_finds_every_source_and_only_what_salachat_runs(tmp_path, monkeypatch, tiny_gguf, hf_folder):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    hf_cache_repo(tmp_path / "hub", "acme/tiny-qwen", {p.name: p for p in hf_folder.iterdir()})
    hf_cache_repo(tmp_path / "hub", "acme/tiny-GGUF", {"tiny.gguf": tiny_gguf})
    unsupported = write_gguf(tmp_path / "src" / "gpt9.gguf", {"general.architecture": ("str", "gpt9")})
    hf_cache_repo(tmp_path / "hub", "acme/gpt9-GGUF", {"gpt9.gguf": unsupported})
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    shutil.copy(hf_folder / "model.safetensors", bert / "model.safetensors")
    hf_cache_repo(tmp_path / "hub", "acme/bert", {p.name: p for p in bert.iterdir()})
    lmstudio = tmp_path / "user" / ".lmstudio" / "models" / "lmstudio-community" / "tiny-GGUF"
    lmstudio.mkdir(parents=True)
    shutil.copy(tiny_gguf, lmstudio / "tiny-Q8_0.gguf")
    blob_data = tiny_gguf.read_bytes()
    digest = hashlib.sha256(blob_data).hexdigest()
    (tmp_path / "ollama" / "blobs").mkdir(parents=True)
    (tmp_path / "ollama" / "blobs" / f"sha256-{digest}").write_bytes(blob_data)
    manifest = tmp_path / "ollama" / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64},
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}"}]}))
    own = models._models_dir() / "smollm2"
    own.mkdir(parents=True)
    shutil.copy(tiny_gguf, own / models.KNOWN_MODELS["smollm2"].filename)

    found = {info.name: info for info in models.list_models()}
    assert set(found) == {"smollm2", "acme/tiny-qwen", "acme/tiny-GGUF:tiny.gguf",
                          "lmstudio:lmstudio-community/tiny-GGUF/tiny-Q8_0.gguf", "ollama:tiny:latest"}
    assert {info.source for info in found.values()} == {"salachat", "huggingface", "lmstudio", "ollama"}
    qwen = found["acme/tiny-qwen"]
    assert (qwen.architecture, qwen.context_length) == ("qwen2", 4096)
    assert qwen.size_bytes == (hf_folder / "model.safetensors").stat().st_size
    tiny = found["ollama:tiny:latest"]
    assert (tiny.architecture, tiny.quant, tiny.context_length, tiny.size_bytes) == (
        "llama", "F32", 128, len(blob_data))
    for name, info in found.items():  # every listed name is one --model accepts
        assert models.resolve(name) == info.path
        assert models.show(name).architecture == info.architecture
    loaded = models.open_model("ollama:tiny", device="cpu")
    assert loaded.model_id == "ollama:tiny"
    with pytest.raises(ModelLoadError):
        models.show("acme/gpt9-GGUF")


def test_remove_deletes_salachats_own_models_only(tmp_path, monkeypatch, tiny_gguf):
    own = models._models_dir() / "smollm2"
    own.mkdir(parents=True)
    shutil.copy(tiny_gguf, own / models.KNOWN_MODELS["smollm2"].filename)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = hf_cache_repo(tmp_path / "hub", "acme/tiny-GGUF", {"tiny.gguf": tiny_gguf})
    with pytest.raises(ModelLoadError, match="salachat removes only"):
        models.remove("acme/tiny-GGUF")
    with pytest.raises(ModelLoadError, match="salachat removes only"):
        models.remove(str(snapshot / "tiny.gguf"))
    assert (snapshot / "tiny.gguf").is_file()
    assert models.remove("smollm2") == tiny_gguf.stat().st_size
    assert not own.exists() and models.locate("smollm2") is None
    with pytest.raises(ModelLoadError, match="not installed"):
        models.remove("smollm2")
