"""Read a GGUF file: metadata, dequantised tensors, and the HF-style names our models expect.

`gguf` (llama.cpp's Python package) dequantises every type it knows (Q4_0, Q4_1, Q8_0, K-quants, F16,
BF16, F32 …). The header we parse ourselves: gguf's GGUFReader builds a numpy view per array item and takes
seconds on a 49K-token vocabulary, which every `salachat ask` would pay. Also ours: the one table mapping
GGUF tensor names to Hugging Face names, and undoing llama.cpp's q/k row permutation so that one RoPE
convention (NeoX "rotate_half", as in HF) serves both GGUF and safetensors checkpoints.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_PATTERNS = [
    (re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), h) for g, h in GGUF_TO_HF.items()
]


class GGUFError(ValueError):
    pass


def hf_name(gguf_name: str) -> str:
    for pattern, hf in _PATTERNS:
        m = pattern.match(gguf_name)
        if m:
            return hf.replace("{i}", m.group(1)) if m.groups() else hf
    raise GGUFError(f"GGUF tensor {gguf_name!r} has no mapping to a Llama weight")


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
        text = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item == _STRING:
                return [self.string() for _ in range(count)]
            if item == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            dtype = np.dtype(_SCALARS[item])
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


@dataclass
class GGUFFile:
    path: Path
    metadata: dict
    tensor_infos: list[TensorInfo] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path) -> "GGUFFile":
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
            metadata = {}
            for _ in range(n_kv):
                key = cur.string()
                metadata[key] = cur.value(cur.take("<I"))
            raw = []
            for _ in range(n_tensors):
                name = cur.string()
                dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
                raw.append((name, tuple(reversed(dims)), GGMLQuantizationType(cur.take("<I")), cur.take("<Q")))
            align = int(metadata.get("general.alignment", 32))
            data_start = (cur.pos + align - 1) // align * align
        except GGUFError as e:
            raise GGUFError(f"{path} is not a readable GGUF file ({e})") from None
        except (struct.error, ValueError, IndexError, OSError) as e:
            raise GGUFError(f"{path} is not a readable GGUF file (truncated or corrupt: {e})") from None
        infos = [TensorInfo(n, shape, q, data_start + off) for n, shape, q, off in raw]
        self = cls(path, metadata, infos)
        self._buf = buf
        return self

    def _array(self, info: TensorInfo) -> np.ndarray:
        block, type_size = GGML_QUANT_SIZES[info.qtype]
        rows, cols = int(np.prod(info.shape[:-1])), info.shape[-1]
        row_bytes = cols // block * type_size
        if info.offset + rows * row_bytes > len(self._buf):
            raise GGUFError(f"{self.path.name}: tensor {info.name} runs past the end of the file (truncated?)")
        data = np.frombuffer(self._buf, np.uint8, rows * row_bytes, info.offset).reshape(rows, row_bytes)
        if info.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = data.view(np.float32 if info.qtype == GGMLQuantizationType.F32 else np.float16)
        return dequantize(data, info.qtype)

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "?")

    def tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """All tensors, dequantised, under HF names, q/k un-permuted."""
        if self.architecture != "llama":
            raise GGUFError(
                f"{self.path.name}: GGUF architecture {self.architecture!r} is not supported (only llama)"
            )
        n_heads = self.metadata["llama.attention.head_count"]
        n_kv = self.metadata.get("llama.attention.head_count_kv", n_heads)
        out: dict[str, torch.Tensor] = {}
        for info in self.tensor_infos:
            array = self._array(info)
            tensor = torch.from_numpy(np.array(array, dtype=np.float32, copy=True)).reshape(info.shape)
            name = hf_name(info.name)
            if name.endswith("q_proj.weight"):
                tensor = unpermute_rope_rows(tensor, n_heads)
            elif name.endswith("k_proj.weight"):
                tensor = unpermute_rope_rows(tensor, n_kv)
            out[name] = tensor.to(dtype)
        return out

    def llama_config(self) -> dict:
        """The metadata as an HF-style config.json dict."""
        m = self.metadata
        hidden = m["llama.embedding_length"]
        heads = m["llama.attention.head_count"]
        has_output = any(t.name == "output.weight" for t in self.tensor_infos)
        vocab = m.get("llama.vocab_size") or len(m["tokenizer.ggml.tokens"])
        return {
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": m["llama.feed_forward_length"],
            "num_hidden_layers": m["llama.block_count"],
            "num_attention_heads": heads,
            "num_key_value_heads": m.get("llama.attention.head_count_kv", heads),
            "head_dim": m.get("llama.attention.key_length", hidden // heads),
            "rms_norm_eps": m.get("llama.attention.layer_norm_rms_epsilon", 1e-5),
            "rope_theta": m.get("llama.rope.freq_base", 10000.0),
            "max_position_embeddings": m.get("llama.context_length", 2048),
            "vocab_size": vocab,
            "tie_word_embeddings": not has_output,
        }
