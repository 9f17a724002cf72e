"""Load a model from a path (a GGUF file or a Hugging Face folder) onto a device, optionally quantised.

What a model *name* means is the product's business (salachat/models.py); the engine takes paths."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
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
    architecture: str = ""  # "llama", "qwen2", "qwen3", "minicpm_sala"
    packed: bool = False  # GGUF weights kept quantised (CPU): what a session must be resumed with too

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


def _as_path(path: str | os.PathLike) -> Path:
    if path is None:
        raise ModelLoadError("no model path given: resolve a model name with salachat.models.resolve first")
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise ModelLoadError(f"{resolved}: no such model file or folder")
    return resolved


def load_model(
    path: str | os.PathLike,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    quant: str | None = None,
    sparse: bool = False,
    kv_gpu_gb: float | None = None,
) -> LoadedModel:
    """Load the model at `path`. A GGUF file on the CPU keeps its Q8_0/Q4_0/Q4_1 weights quantised (matmuls
    on the packed weights, engine/qlinear.py) unless `dtype` asks for them dequantised; elsewhere weights
    are `dtype` (default bf16 on CUDA, fp32 on the CPU). `kv_gpu_gb` (default: $SALACHAT_KV_GPU_GB) bounds
    the device memory of the sparse layers' K/V: older blocks stay in pinned host memory and are fetched
    when selected (engine/kv_offload.py)."""
    if kv_gpu_gb is None and os.environ.get("SALACHAT_KV_GPU_GB"):
        try:
            kv_gpu_gb = float(os.environ["SALACHAT_KV_GPU_GB"])
        except ValueError:
            raise ModelLoadError(
                f"SALACHAT_KV_GPU_GB={os.environ['SALACHAT_KV_GPU_GB']!r} is not a number of GB") from None
    path = _as_path(path)
    dev = pick_device(device)
    from salachat.engine.threads import configure_threads

    configure_threads()
    keep_quantised = dtype is None and dev.type == "cpu" and quant is None
    dtype = dtype or default_dtype(dev)
    try:
        if path.is_file() and (path.suffix.lower() == ".gguf" or _has_gguf_magic(path)):
            loaded = _load_gguf(path, dev, dtype, keep_quantised)
        elif path.is_dir():
            loaded = _load_hf_folder(path, dev, dtype)
        else:
            raise ModelLoadError(f"{path} is neither a .gguf file nor a Hugging Face checkpoint folder")
    except MemoryError:
        raise ModelLoadError(f"{path}: not enough memory to load this model") from None
    _release_freed_memory()
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
    if kv_gpu_gb is not None:
        loaded.kv_gpu_gb = kv_gpu_gb
        try:
            loaded.new_cache()  # a budget below one block per layer is refused here, not mid-reading
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
    return loaded


def _llama_family(config: dict, source: str):
    from salachat.engine.models.llama import LlamaArgs, LlamaForCausalLM

    try:
        return LlamaForCausalLM, LlamaArgs.from_config(config)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{source}: {e}") from None


# config.json model_type (or GGUF general.architecture) → the function giving (model class, args)
FAMILIES = {"llama": _llama_family, "qwen2": _llama_family, "qwen3": _llama_family, "minicpm_sala": None}


def _load_gguf(path: Path, device: torch.device, dtype: torch.dtype, keep_quantised: bool) -> LoadedModel:
    from salachat.engine.gguf_file import GGUFError, GGUFFile
    from salachat.engine.qlinear import KV_DTYPE, QuantLinear

    try:
        gguf = GGUFFile.open(path)
        config = gguf.hf_config()
        tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
    except (GGUFError, ValueError, TypeError) as e:
        raise ModelLoadError(str(e)) from None
    cls, args = _llama_family(config, str(path))
    names = _check_gguf_tensors(gguf, cls, args, str(path))
    keep = QuantLinear.fits if keep_quantised else (lambda info: False)
    try:
        tensors = gguf.tensors(names, args.num_hidden_layers, keep=keep)
    except (GGUFError, ValueError) as e:
        raise ModelLoadError(str(e)) from None
    rope_freqs = tensors.pop("rope_freqs", None)
    model = _build(cls, args, tensors, device, dtype, str(path), release=gguf.drop_pages)
    if keep_quantised and device.type == "cpu":
        # fp32 activations, K/V kept in 16 bits (qlinear.KV_DTYPE: bf16 or fp16 by the CPU): half the cache's
        # memory, and half the bytes a decoded token's attention reads (docs/architecture.md, "Models")
        model.kv_dtype = KV_DTYPE
    if rope_freqs is not None:
        try:
            model.scale_rope_frequencies(rope_freqs)
        except ValueError as e:
            raise ModelLoadError(f"{path}: {e}") from None
    fingerprint = _file_fingerprint(path, json.dumps(config, sort_keys=True).encode())
    return LoadedModel(model, tokenizer, str(path), fingerprint, "llama", device, dtype, architecture=config["model_type"],
                       packed=any(isinstance(m, QuantLinear) for m in model.modules()))


@contextlib.contextmanager
def _no_init():
    """Build modules without running their random init: the weights come from the checkpoint, and on the
    meta device torch's init functions import torch._dynamo (5 s and 150 MB of RSS at the first call)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _release_freed_memory() -> None:
    """Loading frees hundreds of MB of transients; glibc keeps them mapped unless asked to give them back."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _check_gguf_tensors(gguf, cls, args, source: str) -> list[str]:
    """Every tensor the model needs is in the header with the right shape (before any data is read); the
    model's tensor names."""
    with torch.device("meta"), _no_init():
        expected = {name: tuple(t.shape) for name, t in cls(args).state_dict().items()}
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    table = gguf.name_table(list(expected), args.num_hidden_layers)
    present = {table[info.name]: info.shape for info in gguf.tensor_infos if info.name in table}
    for name, shape in expected.items():
        if name not in present:
            raise ModelLoadError(f"{source}: checkpoint lacks tensor {name}")
        if tuple(present[name]) != shape:
            raise ModelLoadError(f"{source}: tensor {name} has shape {tuple(present[name])}, expected {shape}")
    freqs = next((info for info in gguf.tensor_infos if info.name == "rope_freqs.weight"), None)
    if freqs is not None and math.prod(freqs.shape) != args.head_dim // 2:
        raise ModelLoadError(f"{source}: rope_freqs has {math.prod(freqs.shape)} values, expected "
                             f"{args.head_dim // 2} (half the head size)")
    return list(expected)


def _build(cls, args, tensors: dict[str, object], device, dtype, source: str, release=lambda: None):
    """The model on `device` with the checkpoint's tensors; a tensor given as (packed bytes, GGUF info) makes
    its linear layer a quantised one. `release` is called after each such layer copied what it keeps (a
    mapped file's pages, counted in the process's memory while mapped, are let go there)."""
    from salachat.engine.qlinear import QuantEmbedding

    with torch.device("meta"), _no_init():
        model = cls(args)
    expected = dict(model.state_dict())
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise ModelLoadError(f"{source}: checkpoint lacks tensor {missing[0]}"
                             + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    plain, packed = {}, []
    tied_packed = args.tie_word_embeddings and isinstance(tensors.get("model.embed_tokens.weight"), tuple)
    for name, ref in expected.items():
        value = tensors[name]
        shape = tuple(value[1].shape) if isinstance(value, tuple) else tuple(value.shape)
        if shape != tuple(ref.shape):
            raise ModelLoadError(f"{source}: tensor {name} has shape {shape}, expected {tuple(ref.shape)}")
        if tied_packed and name == "model.embed_tokens.weight":
            continue  # read from the LM head's packs, built below: no copy of the file's blocks to throw away
        if isinstance(value, tuple) and isinstance(model.get_submodule(name.removesuffix(".weight")),
                                                   torch.nn.Embedding):
            _set_quantised_embedding(model, name.removesuffix(".weight"), value)
            release()
        elif isinstance(value, tuple):
            packed.append(name.removesuffix(".weight"))
        else:
            plain[name] = value.to(dtype)
    if tied_packed:
        packed.append("lm_head")
    _build_packed(model, packed, tensors, plain, release)
    model.load_state_dict(plain, strict=False, assign=True)
    embed = model.model.embed_tokens
    if args.tie_word_embeddings:
        if tied_packed:
            model.model.embed_tokens = QuantEmbedding.tied(model.lm_head)
        else:
            model.lm_head.weight = embed.weight
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftover:
        raise ModelLoadError(f"{source}: checkpoint lacks tensor {leftover[0]}")
    return model.to(device).eval()


FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # computed side by side where packed alike


def _packed_plan(packed: list[str], tensors: dict[str, object]) -> list[list[str]]:
    """The packed linear layers to build, each as the modules whose rows it holds in order: a layer's q/k/v
    and gate/up, all packed in one type, make one layer each (held by q_proj and gate_proj: one kernel call
    instead of three or two per token); any other module is a layer of its own."""
    qtype = {name: _packed_source(name, tensors)[1].qtype for name in packed}
    plan, done = [], set()
    for name in packed:
        if name in done:
            continue
        parent, _, child = name.rpartition(".")
        group = next((g for g in FUSED if g[0] == child), None)
        members = [f"{parent}.{c}" for c in group] if group else [name]
        if len(members) > 1 and (any(m not in qtype for m in members) or len({qtype[m] for m in members}) > 1):
            members = [name]
        plan.append(members)
        done.update(members)
    return plan


def _packed_source(module_name: str, tensors: dict[str, object]) -> tuple:
    """(raw blocks, GGUF info) of a packed module; a tied LM head is the embedding's."""
    if module_name == "lm_head" and "lm_head.weight" not in tensors:
        return tensors["model.embed_tokens.weight"]
    return tensors[f"{module_name}.weight"]


def _build_packed(model, packed: list[str], tensors: dict[str, object], plain: dict, release) -> None:
    """The packed linear layers in one `Arena` sized from the GGUF header before any is filled, so that the
    transients of packing are freed into memory given back whole rather than left as holes between the
    model's tensors. Their biases are taken out of `plain`."""
    from salachat.engine.qlinear import Arena, QuantLinear

    plan = _packed_plan(packed, tensors)
    shapes = []
    for members in plan:
        infos = [_packed_source(m, tensors)[1] for m in members]
        shapes.append((infos[0].shape[1], sum(info.shape[0] for info in infos), infos[0].qtype.name))
    arena = Arena(sum(QuantLinear.arena_bytes(*shape) for shape in shapes)) if plan else None
    for members, shape in zip(plan, shapes):
        has_bias = model.get_submodule(members[0]).bias is not None
        bias = torch.cat([plain.pop(f"{m}.bias") for m in members]) if has_bias else None
        layer = QuantLinear(*shape, bias=bias, arena=arena)
        begin = 0
        for m in members:
            raw, info = _packed_source(m, tensors)
            layer.load_rows(begin, raw)
            begin += info.shape[0]
            release()
        for i, m in enumerate(members):
            parent, _, child = m.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer if i == 0 else None)


def _set_quantised_embedding(model, module_name: str, value) -> None:
    from salachat.engine.qlinear import QuantEmbedding

    raw, info = value
    parent, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent), child, QuantEmbedding(raw, info.qtype.name, info.shape[1]))


def _load_hf_folder(path: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from salachat.engine.hf import read_hf_folder

    try:
        checkpoint = read_hf_folder(path)
    except (ValueError, OSError) as e:
        raise ModelLoadError(str(e)) from None
    model_type = checkpoint.config.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ModelLoadError(
            f"{path}/config.json: model_type {model_type!r} is not supported ({', '.join(FAMILIES)})")
    extra_stops = checkpoint.config.get("eos_token_id") or []
    extra_stops = extra_stops if isinstance(extra_stops, list) else [extra_stops]
    extra_stops = tuple(i for i in extra_stops if isinstance(i, int) and not isinstance(i, bool))
    try:
        tokenizer = Tokenizer.from_hf_folder(path, extra_stop_ids=extra_stops)
    except (ValueError, OSError) as e:
        raise ModelLoadError(str(e)) from None
    config_bytes = json.dumps(checkpoint.config, sort_keys=True).encode()
    weight_files = sorted(checkpoint.weight_files)
    fingerprint = hashlib.sha256(
        b"".join(_file_fingerprint(f, config_bytes).encode() for f in weight_files)
    ).hexdigest()[:32]
    if model_type == "minicpm_sala":
        from salachat.engine.models.sala import load_sala

        try:
            model = load_sala(checkpoint, device, dtype)
        except (ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{path}: {e}") from None
        return LoadedModel(model, tokenizer, str(path), fingerprint, "minicpm_sala", device, dtype,
                           architecture="minicpm_sala")
    cls, args = FAMILIES[model_type](checkpoint.config, f"{path}/config.json")
    try:
        tensors = checkpoint.load_tensors()
    except (ValueError, OSError) as e:
        raise ModelLoadError(str(e)) from None
    model = _build(cls, args, tensors, device, dtype, str(path))
    return LoadedModel(model, tokenizer, str(path), fingerprint, "llama", device, dtype, architecture=model_type)


def load_tokenizer(path: str | os.PathLike) -> tuple[Tokenizer, int]:
    """The model's tokenizer and its state bytes per token of context, without loading the weights."""
    path = _as_path(path)
    try:
        if path.is_file() and (path.suffix.lower() == ".gguf" or _has_gguf_magic(path)):
            from salachat.engine.gguf_file import GGUFFile

            gguf = GGUFFile.open(path)
            return Tokenizer.from_gguf_metadata(gguf.metadata), kv_bytes_per_token(gguf.hf_config(), 4)
        if path.is_dir():
            from salachat.engine.hf import read_hf_folder

            config = read_hf_folder(path).config
            return Tokenizer.from_hf_folder(path), kv_bytes_per_token(config, 2)
    except (ValueError, OSError, TypeError, KeyError, ZeroDivisionError) as e:
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


@dataclass(frozen=True)
class ModelSummary:
    architecture: str
    size_bytes: int
    quant: str | None
    context_length: int | None


def inspect_model(path: str | os.PathLike) -> ModelSummary:
    """What a model file or folder holds, read from its header or config.json, without its weights;
    ModelLoadError if salachat cannot run it."""
    path = _as_path(path)
    try:
        if path.is_file() and (path.suffix.lower() == ".gguf" or _has_gguf_magic(path)):
            from salachat.engine.gguf_file import GGUFFile

            gguf = GGUFFile.open(path)
            config = gguf.hf_config()
            cls, args = _llama_family(config, str(path))
            _check_gguf_tensors(gguf, cls, args, str(path))
            Tokenizer.check_gguf_metadata(gguf.metadata)
            return ModelSummary(config["model_type"], path.stat().st_size, gguf.main_quant_type(),
                                config.get("max_position_embeddings"))
        if path.is_dir():
            from salachat.engine.hf import read_hf_folder

            checkpoint = read_hf_folder(path)
            model_type = checkpoint.config.get("model_type")
            if not isinstance(model_type, str) or model_type not in FAMILIES:
                raise ModelLoadError(f"{path}/config.json: model_type {model_type!r} is not supported "
                                     f"({', '.join(FAMILIES)})")
            if FAMILIES[model_type] is not None:
                FAMILIES[model_type](checkpoint.config, f"{path}/config.json")
            dtype = checkpoint.config.get("torch_dtype") or checkpoint.config.get("dtype")
            context = checkpoint.config.get("max_position_embeddings")
            return ModelSummary(model_type, sum(f.stat().st_size for f in checkpoint.weight_files),
                                dtype if isinstance(dtype, str) else None,
                                context if isinstance(context, int) else None)
    except (ValueError, OSError, TypeError) as e:
        raise ModelLoadError(str(e)) from None
    raise ModelLoadError(f"{path} is neither a .gguf file nor a Hugging Face checkpoint folder")


def _has_gguf_magic(path: Path) -> bool:
    """Ollama keeps GGUF weights as blobs named by their digest, without a .gguf suffix."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
