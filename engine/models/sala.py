"""MiniCPM-SALA: a hybrid of Lightning (linear) attention layers and InfLLM-V2 sparse attention layers.

`mixer_types` in config.json names each layer's kind: "minicpm4" = sparse softmax attention (GQA, no RoPE:
HyPE leaves position to the linear layers), "lightning-attn" = Lightning attention (RoPE, q/k norm, a fixed
per-head decay, output norm and gate). MiniCPM's muP: embeddings x scale_emb, each residual branch x
scale_depth / sqrt(layers), hidden / (hidden_size / dim_model_base) before the LM head.
docs/architecture.md has every formula.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields

import torch
from salachat import kernels
from salachat.engine.cache import ModelCache
from salachat.engine.lightning_state import LightningState
from salachat.engine.models.llama import MLP, RMSNorm, apply_rope, rope_cos_sin
from salachat.engine.sparse_cache import SparseKVCache
from salachat.kernels import SparseParams
from torch import nn

SPARSE_KINDS = {"minicpm4", "attention", "sparse"}
LIGHTNING_KINDS = {"lightning-attn", "lightning", "lightning_attn"}


@dataclass(frozen=True)
class SalaArgs:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    mixer_types: tuple[str, ...]
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    lightning_nh: int = 0  # 0: num_attention_heads
    lightning_nkv: int = 0  # 0: lightning_nh
    lightning_head_dim: int = 0  # 0: head_dim
    lightning_scale: str = "1/sqrt(d)"
    lightning_use_rope: bool = True
    attn_use_rope: bool = False
    qk_norm: bool = True
    use_output_norm: bool = True
    use_output_gate: bool = True
    attn_use_output_gate: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 524288
    scale_emb: float = 1.0
    scale_depth: float = 1.0
    dim_model_base: int = 0  # 0: no logit scaling
    tie_word_embeddings: bool = False
    sparse: SparseParams = field(default_factory=SparseParams)

    @classmethod
    def from_config(cls, config: dict) -> SalaArgs:
        if config.get("model_type") != "minicpm_sala":
            raise ValueError(f"config model_type is {config.get('model_type')!r}, expected 'minicpm_sala'")
        if config.get("rope_scaling"):
            raise ValueError("rope_scaling in config.json is not supported for MiniCPM-SALA")
        values = {f.name: config[f.name] for f in fields(cls) if f.name in config and f.name != "sparse"}
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
                   and f.name not in values]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        kinds = tuple(values["mixer_types"])
        unknown = sorted({k for k in kinds} - SPARSE_KINDS - LIGHTNING_KINDS)
        if unknown:
            raise ValueError(f"config.json mixer_types has unknown kinds {unknown}")
        if len(kinds) != values["num_hidden_layers"]:
            raise ValueError(f"config.json lists {len(kinds)} mixer_types for {values['num_hidden_layers']} layers")
        values["mixer_types"] = kinds
        head_dim = values.get("head_dim") or values["hidden_size"] // values["num_attention_heads"]
        values["head_dim"] = head_dim
        values["lightning_nh"] = values.get("lightning_nh") or values["num_attention_heads"]
        values["lightning_nkv"] = values.get("lightning_nkv") or values["lightning_nh"]
        values["lightning_head_dim"] = values.get("lightning_head_dim") or head_dim
        values["sparse"] = SparseParams.from_sparse_config(config.get("sparse_config") or {})
        return cls(**values)

    @property
    def residual_scale(self) -> float:
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    def is_sparse(self, layer: int) -> bool:
        return self.mixer_types[layer] in SPARSE_KINDS


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's geometric slopes; for a head count that is not a power of two, the standard interleave."""
    def power_of_two(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_two(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: heads - closest]


def lightning_scale(rule: str, head_dim: int) -> float:
    return {"1/sqrt(d)": head_dim**-0.5, "1/d": 1.0 / head_dim}.get(rule, 1.0)


class LightningAttention(nn.Module):
    def __init__(self, args: SalaArgs):
        super().__init__()
        self.args = args
        h, hkv, d = args.lightning_nh, args.lightning_nkv, args.lightning_head_dim
        self.heads, self.kv_heads, self.head_dim = h, hkv, d
        self.q_proj = nn.Linear(args.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, hkv * d, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, hkv * d, bias=False)
        self.o_proj = nn.Linear(h * d, args.hidden_size, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(d, args.rms_norm_eps)
            self.k_norm = RMSNorm(d, args.rms_norm_eps)
        if args.use_output_norm:
            self.o_norm = RMSNorm(h * d, args.rms_norm_eps)
        if args.use_output_gate:
            self.z_proj = nn.Linear(args.hidden_size, h * d, bias=False)
        # A fixed decay per head, the same in every layer: not a weight, so never in the checkpoint (and kept
        # out of the module's buffers, which loading through the meta device would leave empty).
        self.slopes = alibi_slopes(h)
        self._log_decay: dict[torch.device, torch.Tensor] = {}
        self.scale = lightning_scale(args.lightning_scale, d)

    def log_decay(self, device: torch.device) -> torch.Tensor:
        if device not in self._log_decay:
            self._log_decay[device] = -torch.tensor(self.slopes, dtype=torch.float32, device=device)
        return self._log_decay[device]

    def forward(self, x, cos, sin, state: LightningState) -> torch.Tensor:
        t = x.shape[0]
        if self.k_proj is None:  # q_proj computes q, k, v (and the gate's input) side by side: fuse_projections
            q, k, v, *z = kernels.linear(self.q_proj, x).split(self.q_proj.sizes, dim=-1)
        else:
            q, k, v, z = self.q_proj(x), self.k_proj(x), self.v_proj(x), []
        q = q.view(t, self.heads, self.head_dim)
        k = k.view(t, self.kv_heads, self.head_dim)
        v = v.view(t, self.kv_heads, self.head_dim)
        if self.args.qk_norm and self.args.lightning_use_rope:  # norm and rotation: one kernel each for q, k
            q = kernels.norm_rope(q, self.q_norm.weight, self.q_norm.eps, cos, sin)
            k = kernels.norm_rope(k, self.k_norm.weight, self.k_norm.eps, cos, sin)
        else:
            if self.args.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = q.transpose(0, 1), k.transpose(0, 1)
            if self.args.lightning_use_rope:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = state.step(q, k, v.transpose(0, 1), self.log_decay(x.device), self.scale)  # fp32 [H, T, D]
        return self._output(out, x, z)

    def _output(self, out, x, z):
        """The recurrence's out [H, T, D] to the layer's output [T, hidden]: norm, gate, projection."""
        t = x.shape[0]
        if self.args.use_output_norm and self.args.use_output_gate:  # heads back side by side, norm, gate: one kernel
            gate = z[0] if z else kernels.linear(self.z_proj, x)
            return kernels.linear(self.o_proj, kernels.gated_rms_norm(out, self.o_norm.weight, self.o_norm.eps, gate))
        out = out.to(x.dtype).transpose(0, 1).reshape(t, -1)
        if self.args.use_output_norm:
            out = self.o_norm(out)
        if self.args.use_output_gate:
            out = out * torch.sigmoid(z[0] if z else self.z_proj(x))
        return self.o_proj(out)


class SparseAttention(nn.Module):
    """GQA softmax attention whose cache (SparseKVCache) switches to InfLLM-V2 past dense_len."""

    def __init__(self, args: SalaArgs):
        super().__init__()
        self.args = args
        self.heads, self.kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = args.hidden_size // args.num_attention_heads
        d = self.head_dim
        self.q_proj = nn.Linear(args.hidden_size, self.heads * d, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, self.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, self.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.heads * d, args.hidden_size, bias=False)
        if args.attn_use_output_gate:
            self.o_gate = nn.Linear(args.hidden_size, self.heads * d, bias=False)

    def project(self, x, cos, sin):
        """q, k, v heads-first: everything before the cache (split out so decode graphs can hold it)."""
        t, d = x.shape[0], self.head_dim
        if self.k_proj is None:  # q_proj computes q, k and v side by side: fuse_projections
            q, k, v = kernels.linear(self.q_proj, x).split(self.q_proj.sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(t, self.heads, d).transpose(0, 1)
        k = k.view(t, self.kv_heads, d).transpose(0, 1)
        v = v.view(t, self.kv_heads, d).transpose(0, 1)
        if self.args.attn_use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def finish(self, x, out):
        """Everything after the cache: heads back to the hidden size, output gate, projection."""
        if self.args.attn_use_output_gate:  # the heads side by side and the gate: one kernel on CUDA
            return kernels.linear(self.o_proj, kernels.heads_gate(out, kernels.linear(self.o_gate, x)))
        return kernels.linear(self.o_proj, out.transpose(0, 1).reshape(x.shape[0], -1))

    def forward(self, x, cos, sin, cache: SparseKVCache, pos0: int) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        return self.finish(x, cache.attend(q, k, v, pos0, self.head_dim**-0.5))


class DecoderLayer(nn.Module):
    def __init__(self, args: SalaArgs, index: int):
        super().__init__()
        self.sparse = args.is_sparse(index)
        self.residual_scale = args.residual_scale
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = SparseAttention(args) if self.sparse else LightningAttention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)

    # A layer takes the residual stream as (h, pending): the stream is h + pending * residual_scale, the last
    # layer's MLP output not yet added, so that the add and the norm that reads its result are one kernel.
    def _stream_in(self, h, pending):
        """(the residual stream, its input norm)."""
        if pending is None:
            return h, self.input_layernorm(h)
        norm = self.input_layernorm
        return kernels.add_rms_norm(h, pending, self.residual_scale, norm.weight, norm.eps)

    def before_cache(self, h, pending, rope):
        """A sparse layer up to its cache: (h, x, q, k, v), h the stream with `pending` added."""
        h, x = self._stream_in(h, pending)
        return (h, x, *self.self_attn.project(x, *rope["sparse"]))

    def after_cache(self, h, x, attended):
        """A sparse layer from its cache's output on: (h, pending) after the layer."""
        return self._mlp(h, self.self_attn.finish(x, attended))

    def _mlp(self, h, mixed):
        norm = self.post_attention_layernorm
        h, x = kernels.add_rms_norm(h, mixed, self.residual_scale, norm.weight, norm.eps)
        return h, self.mlp(x)

    def forward(self, h, pending, rope, cache, pos0: int):
        """(h, pending) in, (h, pending) out."""
        h, x = self._stream_in(h, pending)
        if self.sparse:
            mixed = self.self_attn(x, *rope["sparse"], cache, pos0)
        else:
            mixed = self.self_attn(x, *rope["lightning"], cache)
        return self._mlp(h, mixed)


class SalaModel(nn.Module):
    def __init__(self, args: SalaArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class SalaForCausalLM(nn.Module):
    def __init__(self, args: SalaArgs):
        super().__init__()
        self.args = args
        self.model = SalaModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_projections(self) -> None:
        """One matmul where several read the same input: a Lightning layer's q, k, v and gate projections, a
        sparse layer's q, k and v, each MLP's gate and up. A decoded token reads each weight once either way,
        but a few large GEMVs run nearer the copy bandwidth than many small ones, each with its split-K
        reduction (H200, 9B: 144 small GEMVs a token at ~3.1 TB/s). Plain bf16/fp32 linears only; the
        separate modules become None (the forwards split the fused output)."""
        for layer in self.model.layers:
            attn = layer.self_attn
            names = ["q_proj", "k_proj", "v_proj"]
            if not layer.sparse and self.args.use_output_gate:
                names.append("z_proj")
            _fuse_linears(attn, names)
            _fuse_linears(layer.mlp, ["gate_proj", "up_proj"])

    def new_cache(self) -> ModelCache:
        a = self.args
        p = self.model.embed_tokens.weight
        layers = []
        for i in range(a.num_hidden_layers):
            if a.is_sparse(i):
                layers.append(SparseKVCache(a.num_key_value_heads, a.hidden_size // a.num_attention_heads,
                                            a.sparse, p.dtype, p.device))
            else:
                layers.append(LightningState(a.lightning_nh, a.lightning_head_dim, p.device))
        return ModelCache(layers=layers)

    def _decode_graphs(self):
        """CUDA graphs for decode between the sparse layers' caches (engine/decode_graphs.py), made on first use."""
        from salachat.engine import decode_graphs

        if not hasattr(self, "_graphs"):
            self._graphs = decode_graphs.DecodeGraphs() if decode_graphs.enabled_for(self) else None
        return self._graphs

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: ModelCache, last_only: bool = False) -> torch.Tensor:
        a = self.args
        pos0 = cache.position
        positions = torch.arange(pos0, pos0 + ids.shape[0], device=ids.device)
        rope = {
            "lightning": rope_cos_sin(positions, a.lightning_head_dim, a.rope_theta),
            "sparse": rope_cos_sin(positions, a.hidden_size // a.num_attention_heads, a.rope_theta),
        }
        h = self.model.embed_tokens(ids) * a.scale_emb
        graphs = self._decode_graphs() if ids.shape[0] == 1 and h.is_cuda else None
        if graphs is not None:
            logits = self._decode_with_graphs(graphs, h, rope, cache, pos0)
            cache.position = pos0 + 1
            return logits
        pending = None
        for layer, layer_cache in zip(self.model.layers, cache.layers):
            h, pending = layer(h, pending, rope, layer_cache, pos0)
        cache.position = pos0 + ids.shape[0]
        if last_only:
            h, pending = h[-1:], pending[-1:]
        return self._head(h, pending)

    def _head(self, h, pending):
        a = self.args
        norm = self.model.norm
        _, h = kernels.add_rms_norm(h, pending, a.residual_scale, norm.weight, norm.eps)
        if a.dim_model_base:
            h = h / (a.hidden_size / a.dim_model_base)
        return kernels.linear(self.lm_head, h).float()

    def _decode_with_graphs(self, graphs, h, rope, cache, pos0: int) -> torch.Tensor:
        """One token: only the sparse layers' caches (append, select, attend) run eagerly; everything between
        two of them (the end of one sparse layer, the Lightning layers, the start of the next) is a graph."""
        layers = self.model.layers
        sparse = [i for i, layer in enumerate(layers) if layer.sparse]
        x = attended = None
        previous = None
        tables = graphs.stage([*rope["lightning"], *rope["sparse"]])  # once a token, read in place by every graph
        for segment, stop in enumerate(sparse + [len(layers)]):
            first = 0 if previous is None else previous + 1

            def run(h, x, attended, cos_l, sin_l, cos_s, sin_s, previous=previous, first=first, stop=stop):
                rope_here = {"lightning": (cos_l, sin_l), "sparse": (cos_s, sin_s)}
                pending = None
                if previous is not None:
                    h, pending = layers[previous].after_cache(h, x, attended)
                for i in range(first, stop):
                    h, pending = layers[i](h, pending, rope_here, cache.layers[i], None)
                if stop < len(layers):
                    return layers[stop].before_cache(h, pending, rope_here)
                return (self._head(h, pending),)

            inputs = [h, x, attended, *tables]
            outs = graphs.run(segment, run, inputs, [cache.layers[i] for i in range(first, stop)], cache)
            if stop == len(layers):
                return outs[0].clone()  # the graph's buffer is rewritten by the next token
            h, x, q, k, v = outs
            sparse_attn = layers[stop].self_attn
            attended = cache.layers[stop].attend(q, k, v, pos0, sparse_attn.head_dim**-0.5)
            previous = stop
        raise AssertionError("unreachable")


def _fuse_linears(owner: nn.Module, names: list[str]) -> None:
    """owner.<names[0]> becomes one Linear whose output is the named ones' side by side (`sizes` says how to
    split it); the others become None. Left alone unless all are plain bias-free Linears of one dtype."""
    parts = [getattr(owner, n, None) for n in names]
    if any(type(m) is not nn.Linear or m.bias is not None for m in parts):
        return
    if len({(m.weight.dtype, m.weight.device, m.in_features) for m in parts}) != 1:
        return
    first = parts[0]
    weight = torch.cat([m.weight.detach() for m in parts])
    fused = nn.Linear(first.in_features, weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    fused.sizes = [m.out_features for m in parts]
    for n in names:
        setattr(owner, n, None)
    setattr(owner, names[0], fused)


def load_sala(checkpoint, device: torch.device, dtype: torch.dtype) -> SalaForCausalLM:
    """Build the model from an HFCheckpoint. The checkpoint's names are the module names (one table: identity)."""
    from salachat.engine.loader import _build

    args = SalaArgs.from_config(checkpoint.config)
    model = _build(SalaForCausalLM, args, checkpoint.load_tensors(), device, dtype, str(checkpoint.folder))
    model.fuse_projections()
    return model
