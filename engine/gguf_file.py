"""Read a GGUF file: metadata, tensors (raw or dequantised), and the HF-style names our models expect.

`gguf` (llama.cpp's Python package) dequantises every type it knows (Q4_0, Q4_1, Q8_0, K-quants, F16,
BF16, F32 …) and holds llama.cpp's tensor name tables, which map our (HF) names to GGUF's. The header we
parse ourselves: gguf's GGUFReader builds a numpy view per array item and takes seconds on a 49K-token
vocabulary, which every `salachat ask` would pay. Also ours: undoing llama.cpp's q/k row permutation of the
`llama` architecture, so that one RoPE convention (NeoX "rotate_half", as in HF) serves both GGUF and
safetensors checkpoints (llama.cpp's converter leaves Qwen's rows as they are: Qwen uses NeoX RoPE there).

Every bound is checked before anything is allocated: a broken or hostile file is a GGUFError, never a
huge allocation, a deep recursion or an exception of another kind.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, MODEL_ARCH_NAMES, GGMLQuantizationType, get_tensor_name_map
from gguf.quants import dequantize

ARCHITECTURES = ("llama", "qwen2", "qwen3")  # GGUF general.architecture values salachat runs
_ARCH_ENUM = {name: arch for arch, name in MODEL_ARCH_NAMES.items()}
_MAX_DEPTH = 4  # arrays of arrays: tokenizer merges are the deepest real metadata (one level)
_MAX_DIMS = 4
_MAX_ELEMENTS = 1 << 36


class GGUFError(ValueError):
    pass


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time permutation of q/k rows (interleaved pairs → rotate_half halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if n > len(self.buf) - self.pos:
            raise GGUFError(f"a string of {n} bytes runs past the end of the file")
        text = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, kind: int, depth: int = 0):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            if depth >= _MAX_DEPTH:
                raise GGUFError(f"metadata arrays nested more than {_MAX_DEPTH} deep")
            item, count = self.take("<I"), self.take("<Q")
            left = len(self.buf) - self.pos
            if item == _STRING or item == _ARRAY:
                if count > left // 8:  # each item takes at least 8 bytes: a larger count is a lie
                    raise GGUFError(f"an array of {count} items runs past the end of the file")
                if item == _STRING:
                    return [self.string() for _ in range(count)]
                return [self.value(_ARRAY, depth + 1) for _ in range(count)]
            if item not in _SCALARS:
                raise GGUFError(f"unknown GGUF array item type {item}")
            dtype = np.dtype(_SCALARS[item])
            if count > left // dtype.itemsize:
                raise GGUFError(f"an array of {count} items runs past the end of the file")
            values = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
            self.pos += dtype.itemsize * count
            return values
        if kind not in _SCALARS:
            raise GGUFError(f"unknown GGUF value type {kind}")
        return self.take(_SCALARS[kind])


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: slowest dimension first
    qtype: GGMLQuantizationType
    offset: int  # absolute, in the file

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def row_bytes(self) -> int:
        block, type_size = GGML_QUANT_SIZES[self.qtype]
        return self.shape[-1] // block * type_size


@dataclass
class GGUFFile:
    path: Path
    metadata: dict
    tensor_infos: list[TensorInfo] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            cur = _Cursor(buf)
            if bytes(buf[:4]) != b"GGUF":
                raise GGUFError("no GGUF magic number")
            cur.pos = 4
            version = cur.take("<I")
            if version not in (2, 3):
                raise GGUFError(f"GGUF version {version} is not supported (2 and 3 are)")
            n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
            if n_tensors > len(buf) // 24 or n_kv > len(buf) // 12:
                raise GGUFError(f"header claims {n_tensors} tensors and {n_kv} metadata keys, more than fit")
            metadata = {}
            for _ in range(n_kv):
                key = cur.string()
                metadata[key] = cur.value(cur.take("<I"))
            raw = []
            for _ in range(n_tensors):
                name = cur.string()
                n_dims = cur.take("<I")
                if not 1 <= n_dims <= _MAX_DIMS:
                    raise GGUFError(f"tensor {name!r} has {n_dims} dimensions")
                dims = [cur.take("<Q") for _ in range(n_dims)]
                qtype = cur.take("<I")
                try:
                    qtype = GGMLQuantizationType(qtype)
                except ValueError:
                    raise GGUFError(f"tensor {name!r} has unknown type {qtype}") from None
                raw.append((name, tuple(reversed(dims)), qtype, cur.take("<Q")))
            align = metadata.get("general.alignment", 32)
            if not isinstance(align, int) or isinstance(align, bool) or not 1 <= align <= 1 << 20:
                raise GGUFError(f"general.alignment {align!r} is not a sensible alignment")
            data_start = (cur.pos + align - 1) // align * align
            infos = []
            for name, shape, qtype, offset in raw:
                block = GGML_QUANT_SIZES[qtype][0]
                if any(d <= 0 for d in shape) or math.prod(shape) > _MAX_ELEMENTS or shape[-1] % block:
                    raise GGUFError(f"tensor {name!r} has an impossible shape {shape} for {qtype.name}")
                info = TensorInfo(name, shape, qtype, data_start + offset)
                if info.offset + info.rows * info.row_bytes > len(buf):
                    raise GGUFError(f"tensor {name!r} runs past the end of the file (truncated?)")
                infos.append(info)
        except GGUFError as e:
            raise GGUFError(f"{path} is not a readable GGUF file ({e})") from None
        except (struct.error, ValueError, IndexError, OSError, OverflowError, MemoryError) as e:
            raise GGUFError(f"{path} is not a readable GGUF file (truncated or corrupt: {e})") from None
        self = cls(path, metadata, infos)
        self._buf = buf
        return self

    def drop_pages(self) -> None:
        """Let go of the file's pages this process touched (they stay in the page cache): a mapped file counts
        in the process's resident memory, and a loader that reads every tensor once would otherwise hold
        the whole file beside the model it built (94 of 387 MiB at the default model's load peak)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            try:
                self._buf.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The stored bytes of a tensor, [rows, row_bytes], a view of the mapped file."""
        if info.offset + info.rows * info.row_bytes > len(self._buf):
            raise GGUFError(f"{self.path.name}: tensor {info.name} runs past the end of the file (truncated?)")
        return np.frombuffer(self._buf, np.uint8, info.rows * info.row_bytes, info.offset).reshape(
            info.rows, info.row_bytes)

    def _array(self, info: TensorInfo) -> np.ndarray:
        data = self.raw(info)
        if info.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = data.view(np.float32 if info.qtype == GGMLQuantizationType.F32 else np.float16)
        try:
            return dequantize(data, info.qtype)
        except NotImplementedError:
            raise GGUFError(f"{self.path.name}: tensor {info.name} has type {info.qtype.name}, "
                            "which salachat cannot read") from None

    def dequantised(self, info: TensorInfo) -> torch.Tensor:
        return torch.from_numpy(np.array(self._array(info), dtype=np.float32, copy=True)).reshape(info.shape)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture", "?")
        return arch if isinstance(arch, str) else "?"

    def _check_architecture(self) -> str:
        if self.architecture not in ARCHITECTURES:
            raise GGUFError(f"{self.path.name}: GGUF architecture {self.architecture!r} is not supported "
                            f"({', '.join(ARCHITECTURES)})")
        return self.architecture

    def name_table(self, hf_names: list[str], n_layers: int) -> dict[str, str]:
        """GGUF tensor name → our (HF) name, through llama.cpp's own tables for this architecture."""
        table = get_tensor_name_map(_ARCH_ENUM[self._check_architecture()], n_layers)
        out = {}
        for name in hf_names:
            base, _, suffix = name.rpartition(".")
            gguf_base = table.get_name(base)
            if gguf_base is not None:
                out[f"{gguf_base}.{suffix}"] = name
        return out

    def tensors(self, hf_names: list[str], n_layers: int, keep=lambda info: False) -> dict[str, object]:
        """Tensors under our names, q/k rows un-permuted for the `llama` architecture. A tensor for which
        `keep(info)` is true comes back as (its raw blocks [rows, row_bytes] uint8, info) for a quantised layer;
        the others dequantised to fp32. `rope_freqs` (Llama 3.1 scaling) comes back under that name."""
        arch = self._check_architecture()
        table = self.name_table(hf_names, n_layers)
        n_heads = self.metadata.get(f"{arch}.attention.head_count")
        n_kv = self.metadata.get(f"{arch}.attention.head_count_kv", n_heads)
        out: dict[str, object] = {}
        for info in self.tensor_infos:
            if info.name == "rope_freqs.weight":
                out["rope_freqs"] = self.dequantised(info).reshape(-1)
                continue
            name = table.get(info.name)
            if name is None:
                continue  # a tensor our model has no use for (llama.cpp keeps some of its own)
            heads = n_heads if name.endswith("q_proj.weight") else n_kv if name.endswith("k_proj.weight") else 0
            if arch == "llama" and heads:
                if info.rows % (2 * heads):
                    raise GGUFError(f"{self.path.name}: tensor {info.name} rows do not split into {heads} heads")
            else:
                heads = 0
            if keep(info):
                data = self.raw(info)  # a view of the mapped file: the layer copies what it keeps
                if heads:  # rows are whole quantisation blocks: permuting them is exact
                    data = unpermute_rope_rows(torch.from_numpy(data.copy()), heads)
                out[name] = (data, info)
            else:
                tensor = self.dequantised(info)
                out[name] = unpermute_rope_rows(tensor, heads) if heads else tensor
        return out

    def main_quant_type(self) -> str:
        """The type most matrix weights are stored in (what a file name's Q4_1 or Q8_0 says)."""
        counts: dict[str, int] = {}
        for info in self.tensor_infos:
            if len(info.shape) == 2:
                counts[info.qtype.name] = counts.get(info.qtype.name, 0) + math.prod(info.shape)
        return max(counts, key=counts.get) if counts else "?"

    def hf_config(self) -> dict:
        """The metadata as an HF-style config.json dict (values unchecked: LlamaArgs.from_config checks)."""
        arch = self._check_architecture()
        m = self.metadata

        def key(name, default=None):
            full = f"{arch}.{name}"
            if default is None and full not in m:
                raise GGUFError(f"{self.path.name}: metadata lacks {full}")
            return m.get(full, default)

        hidden, heads = key("embedding_length"), key("attention.head_count")
        tokens = m.get("tokenizer.ggml.tokens")
        embedding = next((t for t in self.tensor_infos if t.name == "token_embd.weight"), None)
        vocab = embedding.shape[0] if embedding is not None and len(embedding.shape) == 2 else (
            m.get(f"{arch}.vocab_size") or (len(tokens) if isinstance(tokens, list) else None))
        if vocab is None:
            raise GGUFError(f"{self.path.name}: metadata has neither {arch}.vocab_size nor a token list")
        has_output = any(t.name == "output.weight" for t in self.tensor_infos)
        names = {t.name for t in self.tensor_infos}
        try:
            head_dim = m.get(f"{arch}.attention.key_length") or hidden // heads
        except (TypeError, ZeroDivisionError):
            head_dim = None
        return {
            "model_type": arch,
            "hidden_size": hidden,
            "intermediate_size": key("feed_forward_length"),
            "num_hidden_layers": key("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": m.get(f"{arch}.attention.head_count_kv", heads),
            "head_dim": head_dim,
            "rms_norm_eps": m.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
            "rope_theta": m.get(f"{arch}.rope.freq_base", 10000.0),
            "max_position_embeddings": m.get(f"{arch}.context_length", 2048),
            "vocab_size": vocab,
            "tie_word_embeddings": not has_output,
            "attention_bias": "blk.0.attn_q.bias" in names,
        }

    def llama_config(self) -> dict:  # the name callers used before Qwen
        return self.hf_config()
