"""Load a model by name, GGUF file or Hugging Face folder, onto a device, optionally quantised."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from salachat.engine import registry
from salachat.engine.tokenizer import Tokenizer


class ModelLoadError(Exception):
    """One line for the user: what is wrong with the model they asked for, and what to do."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Tokenizer
    model_id: str  # a name or a path, as the user gave it
    fingerprint: str  # identifies the exact weights + config; sessions refuse to resume on another
    family: str  # "llama" | "minicpm_sala"
    device: torch.device
    dtype: torch.dtype
    sparse: object | None = None  # SparseParams for a Llama model reading past its trained length
    asks_for_citations: bool = True  # whether the system prompt tells the model to cite anchors
    kv_gpu_gb: float | None = None  # sparse layers' K/V kept on the device; the rest in host memory
    quant: str | None = None  # "int8" | "nf4" | None, as loaded

    @property
    def long_context(self) -> str:
        """How this model reads past its trained length: "native" (MiniCPM-SALA), "extended" (a dense model
        with the training-free extension on), "dense" (a dense model as trained)."""
        if self.family == "minicpm_sala":
            return "native"
        return "extended" if self.sparse is not None else "dense"

    def new_cache(self):
        cache = self.model.new_cache(sparse=self.sparse) if self.sparse is not None else self.model.new_cache()
        if self.kv_gpu_gb is not None:
            from salachat.engine.sparse_cache import limit_device_kv

            limit_device_kv(cache, self.kv_gpu_gb)
        return cache


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA GPU is available: use --device cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _file_fingerprint(path: Path, extra: bytes = b"") -> str:
    """sha256 of size + first and last MiB + extra: cheap on 18 GB, and changes with any re-download."""
    h = hashlib.sha256(extra)
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), 2)
            h.update(f.read())
    return h.hexdigest()[:32]


def resolve_spec(spec: str | None) -> Path:
    spec = spec or registry.DEFAULT_MODEL
    if spec in registry.KNOWN_MODELS:
        try:
            return registry.resolve(spec)
        except registry.ModelNotInstalled as e:
            raise ModelLoadError(str(e)) from None
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {spec!r} is neither a known model ({', '.join(registry.KNOWN_MODELS)}) nor an existing path"
        )
    return path


def load_model(
    spec: str | None = None,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    quant: str | None = None,
    sparse: bool = False,
    kv_gpu_gb: float | None = None,
) -> LoadedModel:
    """`kv_gpu_gb` (default: $SALACHAT_KV_GPU_GB) bounds the device memory of the sparse layers' K/V: older
    blocks stay in pinned host memory and are fetched when selected (engine/kv_offload.py)."""
    if kv_gpu_gb is None and os.environ.get("SALACHAT_KV_GPU_GB"):
        try:
            kv_gpu_gb = float(os.environ["SALACHAT_KV_GPU_GB"])
        except ValueError:
            raise ModelLoadError(f"SALACHAT_KV_GPU_GB={os.environ['SALACHAT_KV_GPU_GB']!r} is not a number of GB") from None
    path = resolve_spec(spec)
    dev = pick_device(device)
    dtype = dtype or default_dtype(dev)
    if path.is_file() and path.suffix.lower() == ".gguf":
        loaded = _load_gguf(path, dev, dtype)
    elif path.is_dir():
        loaded = _load_hf_folder(path, dev, dtype)
    else:
        raise ModelLoadError(f"{path} is neither a .gguf file nor a Hugging Face checkpoint folder")
    loaded.model_id = spec or registry.DEFAULT_MODEL
    known = registry.KNOWN_MODELS.get(loaded.model_id)
    if known is None and path.is_file():  # a known model's file passed by path is still that model
        known = next((k for k in registry.KNOWN_MODELS.values() if k.filename == path.name), None)
    if known is not None:
        loaded.asks_for_citations = known.follows_citation_instructions
    if quant:
        from salachat.engine.quant import quantize_linears

        quantize_linears(loaded.model, quant)
        loaded.fingerprint += f"+{quant}"
        loaded.quant = quant
    if sparse:
        if loaded.family != "llama":
            raise ModelLoadError("--sparse applies to Llama-family models (MiniCPM-SALA is sparse already)")
        from salachat.engine.long_context import params_for

        loaded.sparse = params_for(loaded.model)
        loaded.fingerprint += "+sparse"
    if kv_gpu_gb is not None:
        loaded.kv_gpu_gb = kv_gpu_gb
        try:
            loaded.new_cache()  # a budget below one block per layer is refused here, not mid-reading
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
    return loaded


def _load_gguf(path: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from salachat.engine.gguf_file import GGUFError, GGUFFile
    from salachat.engine.models.llama import LlamaArgs, LlamaForCausalLM

    try:
        gguf = GGUFFile.open(path)
        config = gguf.llama_config() if gguf.architecture == "llama" else None
        if config is None:
            raise GGUFError(f"{path.name}: GGUF architecture {gguf.architecture!r} is not supported (only llama)")
        tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
        tensors = gguf.tensors(dtype=torch.float32)
    except (GGUFError, ValueError) as e:
        raise ModelLoadError(str(e)) from None
    args = LlamaArgs.from_config(config)
    model = _build(LlamaForCausalLM, args, tensors, device, dtype, str(path))
    fingerprint = _file_fingerprint(path, json.dumps(config, sort_keys=True).encode())
    return LoadedModel(model, tokenizer, str(path), fingerprint, "llama", device, dtype)


def _build(cls, args, tensors: dict[str, torch.Tensor], device, dtype, source: str):
    with torch.device("meta"):
        model = cls(args)
    expected = dict(model.state_dict())
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise ModelLoadError(f"{source}: checkpoint lacks tensor {missing[0]}" + (f" (+{len(missing)-1} more)" if len(missing) > 1 else ""))
    for name, ref in expected.items():
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise ModelLoadError(
                f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {tuple(ref.shape)}"
            )
    model.load_state_dict({k: tensors[k].to(dtype) for k in expected}, strict=False, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device).eval()


def _load_hf_folder(path: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from salachat.engine.hf import read_hf_folder

    try:
        checkpoint = read_hf_folder(path)
    except (ValueError, OSError) as e:
        raise ModelLoadError(str(e)) from None
    model_type = checkpoint.config.get("model_type")
    extra_stops = checkpoint.config.get("eos_token_id") or []
    extra_stops = tuple(extra_stops if isinstance(extra_stops, list) else [extra_stops])
    tokenizer = Tokenizer.from_hf_folder(path, extra_stop_ids=extra_stops)
    config_bytes = json.dumps(checkpoint.config, sort_keys=True).encode()
    weight_files = sorted(checkpoint.weight_files)
    fingerprint = hashlib.sha256(
        b"".join(_file_fingerprint(f, config_bytes).encode() for f in weight_files)
    ).hexdigest()[:32]
    if model_type == "llama":
        from salachat.engine.models.llama import LlamaArgs, LlamaForCausalLM

        try:
            args = LlamaArgs.from_config(checkpoint.config)
        except (ValueError, TypeError) as e:
            raise ModelLoadError(f"{path}/config.json: {e}") from None
        tensors = checkpoint.load_tensors()
        model = _build(LlamaForCausalLM, args, tensors, device, dtype, str(path))
        return LoadedModel(model, tokenizer, str(path), fingerprint, "llama", device, dtype)
    if model_type == "minicpm_sala":
        from salachat.engine.models.sala import load_sala

        try:
            model = load_sala(checkpoint, device, dtype)
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{path}: {e}") from None
        return LoadedModel(model, tokenizer, str(path), fingerprint, "minicpm_sala", device, dtype)
    raise ModelLoadError(f"{path}/config.json: model_type {model_type!r} is not supported (llama, minicpm_sala)")


def load_tokenizer(spec: str | None = None) -> tuple[Tokenizer, int]:
    """The model's tokenizer and its state bytes per token of context, without loading the weights."""
    path = resolve_spec(spec)
    try:
        if path.is_file() and path.suffix.lower() == ".gguf":
            from salachat.engine.gguf_file import GGUFFile

            gguf = GGUFFile.open(path)
            return Tokenizer.from_gguf_metadata(gguf.metadata), kv_bytes_per_token(gguf.llama_config(), 4)
        if path.is_dir():
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
            return Tokenizer.from_hf_folder(path), kv_bytes_per_token(config, 2)
    except (ValueError, OSError) as e:
        raise ModelLoadError(str(e)) from None
    raise ModelLoadError(f"{path} is neither a .gguf file nor a Hugging Face checkpoint folder")


def kv_bytes_per_token(config: dict, dtype_bytes: int) -> int:
    """Bytes of cache each token of context adds: K and V of every softmax-attention layer.

    Lightning layers of MiniCPM-SALA hold a fixed-size state, so only its sparse layers count."""
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    layers = config["num_hidden_layers"]
    if config.get("model_type") == "minicpm_sala":
        layers = sum(1 for kind in config.get("mixer_types", []) if kind == "minicpm4")
    return layers * 2 * kv * head_dim * dtype_bytes
