"""Llama-family decoder (SmolLM2, Llama 2/3.x, TinyLlama, Qwen2/2.5, Qwen3 …) in plain PyTorch, one sequence
at a time."""

from __future__ import annotations

import functools
import math
from dataclasses import MISSING, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from salachat.engine.cache import KVCache, ModelCache
from salachat.engine.qlinear import PREFILL_ROWS, QuantLinear
from salachat.engine.threads import keep_fitting
from salachat.kernels import cpu_decode, packed_gemv
from torch import nn

from salachat import kernels

# model_type → (q/k/v biases by default, q/k RMSNorm per head). Qwen2 differs from Llama by its attention
# biases, Qwen3 by its per-head q/k norms: two flags, not two model files.
FAMILY_FLAGS = {"llama": (False, False), "qwen2": (True, False), "qwen3": (False, True)}
_LIMITS = {"hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 1024,
           "num_attention_heads": 1024, "num_key_value_heads": 1024, "vocab_size": 1 << 22, "head_dim": 1024,
           "max_position_embeddings": 1 << 30}


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
    attention_bias: bool = False
    qk_norm: bool = False
    # RoPE scaling: "default", "linear" (positions divided by factor) or "llama3" (Llama 3.1's per-band rule)
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192

    @classmethod
    def from_config(cls, config: dict) -> LlamaArgs:
        """Args from an HF config.json dict (either transformers' `rope_scaling` + `rope_theta` or 5.x's
        `rope_parameters`); ValueError with the key at fault for anything out of shape."""
        if not isinstance(config, dict):
            raise TypeError("config is not a JSON object")
        model_type = config.get("model_type")
        if model_type not in FAMILY_FLAGS:
            raise ValueError(f"config model_type is {model_type!r}, expected one of {', '.join(FAMILY_FLAGS)}")
        default_bias, qk_norm = FAMILY_FLAGS[model_type]
        values = {k: v for k, v in config.items() if v is not None}
        values.setdefault("num_key_value_heads", values.get("num_attention_heads"))
        if not values.get("head_dim") and _positive_int(values, "hidden_size") and _positive_int(
                values, "num_attention_heads"):
            values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
        values.setdefault("attention_bias", default_bias)
        values["qk_norm"] = qk_norm
        rope = values.get("rope_scaling") or values.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise TypeError("rope_scaling is not an object")
        if "rope_theta" not in values and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported (default, linear, llama3)")
        values["rope_type"] = rope_type
        if rope_type != "default":
            values["rope_factor"] = rope.get("factor", 1.0)
        if rope_type == "llama3":
            for key, field in [("low_freq_factor", "rope_low_freq_factor"), ("high_freq_factor",
                               "rope_high_freq_factor"), ("original_max_position_embeddings",
                                                          "rope_original_max_position")]:
                if key not in rope:
                    raise ValueError(f"llama3 rope_scaling lacks {key}")
                values[field] = rope[key]
        names = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in values]
        if missing:
            raise ValueError(f"config lacks {', '.join(missing)}")
        args = cls(**{k: v for k, v in values.items() if k in names})
        args.check()
        return args

    def check(self) -> None:
        for name, limit in _LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
                raise ValueError(f"{name} = {value!r} is not a whole number between 1 and {limit}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} is odd: RoPE pairs dimensions")
        for name in ("rms_norm_eps", "rope_theta", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} = {value!r} is not a positive number")
        if self.rope_type == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ValueError("llama3 rope_scaling needs high_freq_factor > low_freq_factor")
        if isinstance(self.rope_original_max_position, bool) or not isinstance(
                self.rope_original_max_position, int) or self.rope_original_max_position <= 0:
            raise ValueError("original_max_position_embeddings is not a positive whole number")
        for name in ("tie_word_embeddings", "attention_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} = {getattr(self, name)!r} is not true or false")


def _positive_int(values: dict, key: str) -> bool:
    value = values.get(key)
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


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
        # a copy per device, made once: copying a CPU tensor to the GPU waits for the stream, which at decode
        # drained the GPU's queue twice a token
        self._on: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def plain(cls, head_dim: int, theta: float) -> Rotary:
        return _plain_rotary(head_dim, float(theta))

    @classmethod
    def for_args(cls, args: LlamaArgs) -> Rotary:
        inv_freq = cls.plain(args.head_dim, args.rope_theta).inv_freq
        if args.rope_type == "linear":
            inv_freq = inv_freq / args.rope_factor
        elif args.rope_type == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, args)
        return cls(inv_freq)


    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._on.get(positions.device)
        if inv_freq is None:
            inv_freq = self._on[positions.device] = self.inv_freq.to(positions.device)
        angles = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos(), emb.sin()


@functools.lru_cache(maxsize=16)
def _plain_rotary(head_dim: int, theta: float) -> Rotary:
    # on the CPU explicitly: models are built under a meta-device context
    return Rotary(1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)))


def llama3_inv_freq(inv_freq: torch.Tensor, args: LlamaArgs) -> torch.Tensor:
    """Llama 3.1's RoPE scaling: wavelengths longer than the original context / low_freq_factor are stretched
    by `factor`, shorter than it / high_freq_factor kept, and the band between interpolated smoothly."""
    factor, low, high = args.rope_factor, args.rope_low_freq_factor, args.rope_high_freq_factor
    old = args.rope_original_max_position
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX / rotate_half RoPE on x [heads, T, D] in fp32, returned in x's dtype."""
    return kernels.rope(x, cos, sin)


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=False)
        if args.qk_norm:  # Qwen3: RMSNorm over each head's channels, one weight shared by the heads
            self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.qk_norm = args.qk_norm

    def forward(self, x, cos, sin, cache, pos0: int, rotary: Rotary) -> torch.Tensor:
        t = x.shape[0]
        if self.k_proj is None:  # q_proj computes q, k and v side by side (fused packed weights)
            q, k, v = self.q_proj(x).split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                                            self.n_kv * self.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(t, self.n_heads, self.head_dim).transpose(0, 1)
        k = k.reshape(t, self.n_kv, self.head_dim).transpose(0, 1)
        v = v.reshape(t, self.n_kv, self.head_dim).transpose(0, 1)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if getattr(cache, "places_positions", False):
            # the long-context extension keeps keys unrotated and decides each query-key distance itself
            out = cache.attend_unrotated(q, k, v, pos0, self.head_dim**-0.5, rotary)
        else:
            # one call rotates q and k together: at decode every call is a handful of small kernels
            q, k = apply_rope(torch.cat([q, k]), cos, sin).split([self.n_heads, self.n_kv])
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
        if self.up_proj is None:  # gate_proj computes gate and up side by side (fused weights): one kernel on CUDA
            return kernels.linear(self.down_proj, kernels.silu_mul(kernels.linear(self.gate_proj, x)))
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

    def packed_decode_fits(self) -> bool:
        """Whether `decode_packed` computes this block: q/k/v and gate/up each one packed matmul, no biases,
        no q/k norms (the default model's shape; others take `forward`)."""
        attn, mlp = self.self_attn, self.mlp
        return (attn.k_proj is None and mlp.up_proj is None and not attn.qk_norm
                and all(isinstance(m, QuantLinear) and m.bias is None
                        for m in (attn.q_proj, attn.o_proj, mlp.gate_proj, mlp.down_proj)))

    def decode_packed(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, cache: KVCache,
                      pos0: int) -> torch.Tensor:
        """`forward` for one token x [1, hidden] (fp32) of a packed model on the CPU over a dense 16-bit cache, the
        modules' own calls skipped. The matmuls are `QuantLinear.one_row`: fp32 out of the numba kernel, bf16 out
        of torch's int4 kernel where numba does not serve (then the same bits as `forward`: its bf16 outputs are
        not cast to fp32 and back where the next step rounds them to bf16 anyway). `sin_signed` is sin with its
        first half negated: RoPE's rotate_half is then a roll (`rope_decode`)."""
        attn, mlp = self.self_attn, self.mlp
        n_heads, n_kv, d = attn.n_heads, attn.n_kv, attn.head_dim
        qkv = attn.q_proj.one_row(x, norm=self.input_layernorm)[0]  # [(heads + 2 kv heads) * d]
        qk = rope_decode(qkv[: (n_heads + n_kv) * d].view(n_heads + n_kv, 1, d), cos, sin_signed)
        v = qkv[(n_heads + n_kv) * d :].view(n_kv, 1, d)
        out = cache.attend(qk[:n_heads], qk[n_heads:], v, pos0, d**-0.5)  # [heads, 1, d]
        x = x + attn.o_proj.one_row(out.reshape(1, n_heads * d))  # added in fp32
        gate_up = mlp.gate_proj.one_row(x, norm=self.post_attention_layernorm)
        return x + mlp.down_proj.one_row(gate_up, silu_mul=True)


def rope_decode(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """`rope_ref` (fp32 inside, x's dtype out) with rotate_half as a roll by half the head and the sign in
    `sin_signed`: (-a) * s and a * (-s) are the same float, so the same bits in fewer ops."""
    x32 = x.float()
    return (x32 * cos + x32.roll(x.shape[-1] // 2, -1) * sin_signed).to(x.dtype)


class LlamaModel(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    kv_dtype: torch.dtype | None = None  # the caches' dtype where it is not the activations' (loader.py)
    fused_decode: bool = True  # a packed model's CPU decode step in one numba call (`_decode_step`) where it fits

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = Rotary.for_args(args)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def scale_rope_frequencies(self, factors: torch.Tensor) -> None:
        """GGUF's `rope_freqs` tensor: llama.cpp divides each RoPE frequency by its factor (how Llama 3.1's
        scaling reaches a GGUF file)."""
        plain = Rotary.plain(self.args.head_dim, self.args.rope_theta).inv_freq
        if tuple(factors.shape) != tuple(plain.shape) or not bool(torch.isfinite(factors).all() & (factors > 0).all()):
            raise ValueError(f"rope_freqs has shape {tuple(factors.shape)} or non-positive values; expected "
                             f"{tuple(plain.shape)} positive factors")
        self.rotary = Rotary(plain / factors.float().cpu())

    def _packed_kinds(self) -> set[str]:
        kinds = self.__dict__.get("_kinds")
        if kinds is None:
            kinds = self.__dict__["_kinds"] = {m.qtype for m in self.modules() if isinstance(m, QuantLinear)}
        return kinds

    def _packed_decode(self, cache: ModelCache) -> bool:
        """Whether a decode step takes `Block.decode_packed`: every block fits it, every cache is a dense
        KVCache in 16 bits (a packed model's), and the kernels are not forced to a non-default implementation."""
        fits = self.__dict__.get("_blocks_fit_packed_decode")
        if fits is None:
            fits = self.__dict__["_blocks_fit_packed_decode"] = all(l.packed_decode_fits() for l in self.model.layers)
        return (fits and kernels._FORCED[0] is None
                and all(type(c) is KVCache and c.keys.dtype in (torch.bfloat16, torch.float16) for c in cache.layers))

    def _step_weights(self) -> np.ndarray | None:
        """The layers' rows of `numba_step.COLUMNS` but the caches' (filled per cache by `_decode_step`), or None
        where a layer's shapes or kinds are not the whole-step kernel's."""
        if "_step_table" in self.__dict__:
            return self.__dict__["_step_table"]
        from salachat.engine.qlinear import PACK_BLOCK
        from salachat.kernels.cpu_decode import numba_step

        a, table, held = self.args, None, []
        fits = a.head_dim % 16 == 0 and all(
            m.qtype in numba_step.KINDS and m.in_features % 32 == 0 and m.out_features % PACK_BLOCK == 0
            and all(b.is_contiguous() for b in (m.packed0, m.gguf_numbers))
            for layer in self.model.layers
            for m in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.down_proj))
        norms = [n.weight for layer in self.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        if fits and all(w.dtype == torch.float32 and w.is_contiguous() for w in norms):
            table = np.zeros((len(self.model.layers), len(numba_step.COLUMNS)), np.int64)
            for row, layer in zip(table, self.model.layers):
                matrices = (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.down_proj)
                for i, m in enumerate(matrices):
                    pack1 = m.packed1 if m.n_packs > 1 else m.packed0
                    row[4 * i : 4 * i + 4] = (m.packed0.data_ptr(), pack1.data_ptr(), m.gguf_numbers.data_ptr(),
                                              numba_step.KINDS.index(m.qtype))
                    held += [m.packed0, pack1, m.gguf_numbers]
                row[16:18] = layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr()
                held += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        # the tensors whose addresses the table holds are held with it: a buffer replaced later cannot leave the
        # kernel reading freed memory
        self.__dict__["_step_table"] = table
        self.__dict__["_step_tensors"] = held
        return table

    def _decode_step(self, h: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, cache: ModelCache,
                     pos0: int) -> bool:
        """`Block.decode_packed` through every layer in one numba call (`cpu_decode.decode_step`: the same
        kernels and roundings without a torch call between them), h [1, hidden] fp32 updated in place; False
        where it does not serve (then nothing was changed)."""
        if not self.fused_decode or h.dtype != torch.float32 or cos.dtype != torch.float32 or not h.is_contiguous():
            return False
        weights = self._step_weights()
        layers = cache.layers
        if weights is None or any(c.length != pos0 for c in layers):
            return False
        for c in layers:
            c.make_room(1)
        at = tuple(c.keys.data_ptr() for c in layers)
        table = cache.extra.get("_step_table")
        if table is None or table[1] != at or table[0] is not weights:
            rows = weights.copy()
            for row, c in zip(rows, layers):
                row[18:24] = (c.keys.data_ptr(), c.values.data_ptr(), *c.keys.stride()[:2], *c.values.stride()[:2])
            table = cache.extra["_step_table"] = (weights, at, rows)
        a = self.args
        done = cpu_decode.decode_step(table[2], h, pos0, cos.reshape(-1).contiguous(), sin_signed.reshape(-1),
                                      a.num_key_value_heads, a.num_attention_heads // a.num_key_value_heads,
                                      a.intermediate_size, a.rms_norm_eps, a.head_dim**-0.5, layers[0].keys.dtype)
        if done:
            for c in layers:
                c.advance(1)
        return done

    def new_cache(self, sparse=None) -> ModelCache:
        """A dense KV cache per layer; with `sparse`, the long-context caches it builds (`sparse.layer_cache`),
        or for bare SparseParams InfLLM-V2 block-sparse caches."""
        a = self.args
        p = next(self.parameters())
        dtype = self.kv_dtype or (p.dtype if p.dtype.is_floating_point else torch.bfloat16)
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
    def forward(self, ids: torch.Tensor, cache: ModelCache, last_only: bool = False) -> torch.Tensor:
        """Logits of every token, or with `last_only` of the last (prefill needs no LM head for the rest)."""
        if ids.device.type == "cpu":
            keep_fitting()
            packed_gemv.prepare(self._packed_kinds())  # loads while the prompt is read; decode waits for it
            if self.fused_decode and self.kv_dtype is not None and self._packed_kinds():
                a = self.args
                cpu_decode.prepare_step(a.num_attention_heads // a.num_key_value_heads, a.head_dim, self.kv_dtype)
        pos0 = cache.position
        positions = torch.arange(pos0, pos0 + ids.shape[0], device=ids.device)
        cos, sin = self.rotary.cos_sin(positions)
        h = self.model.embed_tokens(ids)
        if ids.shape[0] == 1 and ids.device.type == "cpu" and self._packed_decode(cache):
            half = sin.shape[-1] // 2
            sin_signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
            if not self._decode_step(h, cos, sin_signed, cache, pos0):
                for layer, layer_cache in zip(self.model.layers, cache.layers):
                    h = layer.decode_packed(h, cos, sin_signed, layer_cache, pos0)
        else:
            for layer, layer_cache in zip(self.model.layers, cache.layers):
                h = layer(h, cos, sin, layer_cache, pos0, self.rotary)
        cache.position = pos0 + ids.shape[0]
        x = self.model.norm(h[-1:] if last_only else h)
        packed = isinstance(self.lm_head, QuantLinear)
        if packed and x.shape[0] == 1 and x.device.type == "cpu":
            logits = packed_gemv.matvec(self.lm_head, x)  # exact weights
            if logits is not None:
                if self.lm_head.bias is not None:
                    logits = logits + self.lm_head.bias.float()
                if packed_gemv.rounds_activations(self.lm_head):  # 8-bit input: near-ties decided in fp32
                    logits = self.lm_head.refine_top(x, logits)
                return logits
        logits = self.lm_head(x).float()
        if packed and x.shape[0] < PREFILL_ROWS:  # torch's kernel's bf16 logits
            logits = self.lm_head.refine_top(x, logits)
        return logits
