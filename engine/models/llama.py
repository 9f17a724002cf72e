"""Llama-family decoder (SmolLM2, Llama 2/3, TinyLlama …) in plain PyTorch, one sequence at a time."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from salachat import kernels
from salachat.engine.cache import KVCache, ModelCache


@dataclass(frozen=True)
class LlamaArgs:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config: dict) -> "LlamaArgs":
        if config.get("model_type") != "llama":
            raise ValueError(f"config model_type is {config.get('model_type')!r}, expected 'llama'")
        if config.get("rope_scaling"):
            raise ValueError("rope_scaling in config.json is not supported yet for Llama checkpoints")
        values = dict(config)
        values.setdefault("num_key_value_heads", config.get("num_attention_heads"))
        if not values.get("head_dim"):
            values["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
        names = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [n for n in required if n not in values]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in values.items() if k in names})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32, round back to the activation dtype, then scale: HF's rounding order (one kernel
        # on CUDA, kernels/pointwise)
        return kernels.rms_norm(x, self.weight, self.eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    return Rotary.plain(head_dim, theta).cos_sin(positions)


class Rotary:
    """RoPE frequencies of one model. Caches that place keys at positions of their own (the long-context
    extension) get this object and rotate queries and keys themselves."""

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq.float()

    @classmethod
    def plain(cls, head_dim: int, theta: float) -> "Rotary":
        # on the CPU explicitly: models are built under a meta-device context
        return cls(1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.to(positions.device)
        angles = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX / rotate_half RoPE on x [heads, T, D] in fp32, returned in x's dtype."""
    return kernels.rope(x, cos, sin)


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache, pos0: int, rotary: Rotary) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.n_heads, self.head_dim).transpose(0, 1)
        k = self.k_proj(x).view(t, self.n_kv, self.head_dim).transpose(0, 1)
        v = self.v_proj(x).view(t, self.n_kv, self.head_dim).transpose(0, 1)
        if getattr(cache, "places_positions", False):
            # the long-context extension keeps keys unrotated and decides each query-key distance itself
            out = cache.attend_unrotated(q, k, v, pos0, self.head_dim**-0.5, rotary)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            out = cache.attend(q, k, v, pos0, self.head_dim**-0.5)
        return self.o_proj(out.transpose(0, 1).reshape(t, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)

    def forward(self, x, cos, sin, cache, pos0, rotary):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pos0, rotary)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = Rotary.plain(args.head_dim, args.rope_theta)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(self, sparse=None) -> ModelCache:
        """A dense KV cache per layer; with `sparse`, the long-context caches it builds (`sparse.layer_cache`),
        or for bare SparseParams InfLLM-V2 block-sparse caches."""
        a = self.args
        p = next(self.parameters())
        dtype = p.dtype if p.dtype.is_floating_point else torch.bfloat16
        if sparse is None:
            layers = [KVCache(a.num_key_value_heads, a.head_dim, dtype, p.device) for _ in range(a.num_hidden_layers)]
        elif hasattr(sparse, "layer_cache"):
            layers = [sparse.layer_cache(a.num_key_value_heads, a.head_dim, dtype, p.device)
                      for _ in range(a.num_hidden_layers)]
        else:
            from salachat.engine.sparse_cache import SparseKVCache

            layers = [
                SparseKVCache(a.num_key_value_heads, a.head_dim, sparse, dtype, p.device)
                for _ in range(a.num_hidden_layers)
            ]
        return ModelCache(layers=layers)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        pos0 = cache.position
        positions = torch.arange(pos0, pos0 + ids.shape[0], device=ids.device)
        cos, sin = self.rotary.cos_sin(positions)
        h = self.model.embed_tokens(ids)
        for layer, layer_cache in zip(self.model.layers, cache.layers):
            h = layer(h, cos, sin, layer_cache, pos0, self.rotary)
        cache.position = pos0 + ids.shape[0]
        return self.lm_head(self.model.norm(h)).float()
