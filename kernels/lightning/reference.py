"""Lightning attention (SALA's linear layers): Simple-GLA with a fixed per-head decay, in plain PyTorch.

Per head h, with per-step retention exp(g_h) (g_h < 0) and scale s:
    S_t = exp(g_h) * S_{t-1} + k_t^T v_t          (state [D_k, D_v], decay before the current token)
    o_t = s * q_t @ S_t                           (includes the current token; no normaliser)
All math in fp32 whatever the inputs; the state is fp32. Layout is heads-first, one sequence: q [H, T, D],
k and v [Hkv, T, D] (GQA: q head h reads kv head h // (H // Hkv)), state [H, D, D].
"""

from __future__ import annotations

import torch


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[0] == heads else x.repeat_interleave(heads // x.shape[0], dim=0)


def lightning_recurrent_ref(q, k, v, log_decay, scale, state=None):
    """The definition, one token at a time. O(T) steps; for tests and decode."""
    heads, t, d = q.shape
    k, v = _expand_kv(k, heads).float(), _expand_kv(v, heads).float()
    s = torch.zeros(heads, d, v.shape[-1], dtype=torch.float32, device=q.device) if state is None else state.float().clone()
    retention = torch.exp(log_decay.float())[:, None, None]
    out = torch.empty(heads, t, v.shape[-1], dtype=torch.float32, device=q.device)
    for i in range(t):
        s = retention * s + k[:, i, :, None] * v[:, i, None, :]
        out[:, i] = scale * torch.einsum("hd,hde->he", q[:, i].float(), s)
    return out, s


def lightning_attention_ref(q, k, v, log_decay, scale, state=None, chunk: int | None = None):
    """Chunked form, O(T * chunk) memory: inside a chunk, decay-masked attention; across chunks, the state.

    For a chunk of n tokens starting from state S (position i counted from 0 inside the chunk):
        o_i   = s * exp(g (i+1)) q_i S + s * sum_{j<=i} exp(g (i-j)) (q_i . k_j) v_j
        S_new = exp(g n) S + sum_j exp(g (n-1-j)) k_j^T v_j
    """
    heads, t, d = q.shape
    # the decay mask is formed per pair, so long chunks cannot overflow; on a GPU fewer, larger steps win
    chunk = chunk or (256 if q.is_cuda else 64)
    k, v = _expand_kv(k, heads).float(), _expand_kv(v, heads).float()
    q = q.float()
    g = log_decay.float().to(q.device)
    s = torch.zeros(heads, d, v.shape[-1], dtype=torch.float32, device=q.device) if state is None else state.float().clone()
    out = torch.empty(heads, t, v.shape[-1], dtype=torch.float32, device=q.device)
    for begin in range(0, t, chunk):
        qc, kc, vc = q[:, begin : begin + chunk], k[:, begin : begin + chunk], v[:, begin : begin + chunk]
        n = qc.shape[1]
        pos = torch.arange(n, device=q.device, dtype=torch.float32)
        diff = pos[:, None] - pos[None, :]
        # exp of a masked exponent, never exp(+large) * 0: the future half would overflow for strong decays
        decay = torch.exp(torch.where(diff >= 0, g[:, None, None] * diff, torch.tensor(float("-inf"), device=q.device)))
        scores = torch.einsum("hid,hjd->hij", qc, kc) * decay
        inter = torch.einsum("hid,hde->hie", qc * torch.exp(g[:, None] * (pos + 1))[..., None], s)
        out[:, begin : begin + n] = scale * (inter + torch.einsum("hij,hje->hie", scores, vc))
        to_end = torch.exp(g[:, None] * (n - 1 - pos))[..., None]
        s = torch.exp(g * n)[:, None, None] * s + torch.einsum("hjd,hje->hde", kc * to_end, vc)
    return out, s
