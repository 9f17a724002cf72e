"""Read a GGUF file: metadata, dequantised tensors, and the HF-style names our models expect.

`gguf` (the reference Python reader from llama.cpp) parses the file and dequantises every type it knows
(Q4_0, Q4_1, Q8_0, K-quants, F16, BF16, F32 …). Two things are ours: the one table mapping GGUF tensor
names to Hugging Face names, and undoing llama.cpp's q/k row permutation so that one RoPE convention
(NeoX "rotate_half", as in HF) serves both GGUF and safetensors checkpoints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType
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


def _field_value(field):
    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        inner = field.types[-1]
        if inner == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return field.parts[field.data[0]].tolist()[0]


@dataclass
class GGUFFile:
    path: Path
    metadata: dict

    @classmethod
    def open(cls, path: str | Path) -> "GGUFFile":
        path = Path(path)
        try:
            reader = GGUFReader(path)
        except Exception as e:  # gguf raises bare ValueErrors/struct errors on junk
            raise GGUFError(f"{path} is not a readable GGUF file ({e})") from None
        metadata = {name: _field_value(field) for name, field in reader.fields.items()}
        self = cls(path, metadata)
        self._reader = reader
        return self

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
        for t in self._reader.tensors:
            array = dequantize(t.data, t.tensor_type)
            shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists the fastest dimension first
            tensor = torch.from_numpy(np.array(array, dtype=np.float32, copy=True)).reshape(shape)
            name = hf_name(t.name)
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
        has_output = any(t.name == "output.weight" for t in self._reader.tensors)
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
