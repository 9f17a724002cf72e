"""The PyTorch references against naive formulas written here, token by token and block by block."""

import math

import pytest
import torch
from salachat.kernels import SparseParams
from salachat.kernels.lightning.reference import lightning_attention_ref, lightning_recurrent_ref
from salachat.kernels.sparse.reference import block_sparse_attention_ref, compress_keys_ref, select_blocks_ref


def report(a, b):
    diff = (a.float() - b.float())
    return f"max-abs {diff.abs().max().item():.2e}, rel-rms {diff.norm().item() / max(b.float().norm().item(), 1e-12):.2e}"


def naive_lightning(q, k, v, g, scale, s0):
    heads, t, d = q.shape
    group = heads // k.shape[0]
    out = torch.zeros(heads, t, d, dtype=torch.float64)
    state = s0.double().clone()
    for h in range(heads):
        s = state[h]
        for i in range(t):
            s = math.exp(g[h]) * s + torch.outer(k[h // group, i].double(), v[h // group, i].double())
            out[h, i] = scale * q[h, i].double() @ s
        state[h] = s
    return out, state


@pytest.mark.parametrize("t", [1, 5, 63, 64, 65, 130])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_lightning_references_match_token_loop(t, kv_heads):
    torch.manual_seed(t)
    q, k, v = torch.randn(4, t, 8), torch.randn(kv_heads, t, 8), torch.randn(kv_heads, t, 8)
    g = -torch.tensor([0.9, 0.3, 0.05, 0.004])
    s0 = torch.randn(4, 8, 8)
    expected, expected_state = naive_lightning(q, k, v, g.tolist(), 0.35, s0)
    for impl in (lightning_attention_ref, lightning_recurrent_ref):
        out, state = impl(q, k, v, g, 0.35, s0)
        assert torch.allclose(out.double(), expected, atol=1e-4, rtol=1e-4), report(out, expected)
        assert torch.allclose(state.double(), expected_state, atol=1e-4, rtol=1e-4), report(state, expected_state)


def test_lightning_chunked_equals_split_calls():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 100, 8), torch.randn(2, 100, 8), torch.randn(2, 100, 8)
    g = -torch.tensor([0.5, 0.01])
    whole, s_whole = lightning_attention_ref(q, k, v, g, 0.3)
    first, s1 = lightning_attention_ref(q[:, :37], k[:, :37], v[:, :37], g, 0.3)
    second, s2 = lightning_attention_ref(q[:, 37:], k[:, 37:], v[:, 37:], g, 0.3, s1)
    assert torch.allclose(torch.cat([first, second], 1), whole, atol=1e-5)
    assert torch.allclose(s2, s_whole, atol=1e-5)


def test_compress_keys_are_means_of_whole_chunks():
    k = torch.randn(2, 50, 4)
    k1 = compress_keys_ref(k, 8, 4)
    assert k1.shape == (2, (50 - 8) // 4 + 1, 4)
    for j in range(k1.shape[1]):
        assert torch.allclose(k1[:, j], k[:, 4 * j : 4 * j + 8].mean(1), atol=1e-6)
    assert compress_keys_ref(k[:, :7], 8, 4).shape[1] == 0


def naive_selection(q, k, q_pos0, p: SparseParams, scale):
    """Block selection for each query, written as loops from the definition."""
    heads, t, _d = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    results = torch.full((kv_heads, t, p.selected), -1, dtype=torch.int32)
    for i in range(t):
        pos = q_pos0 + i
        qb = pos // p.block_size
        for g in range(kv_heads):
            n1 = max(0, (k.shape[1] - p.kernel_size) // p.kernel_stride + 1)
            n2 = max(0, (k.shape[1] - 4 * p.kernel_size) // (4 * p.kernel_stride) + 1)
            k1 = [k[g, j * p.kernel_stride : j * p.kernel_stride + p.kernel_size].mean(0) for j in range(n1)]
            k2 = [k[g, j * 4 * p.kernel_stride : j * 4 * p.kernel_stride + 4 * p.kernel_size].mean(0) for j in range(n2)]
            vis1 = [j for j in range(n1) if j * p.kernel_stride + p.kernel_size <= pos + 1]
            vis2 = [j for j in range(n2) if j * 4 * p.kernel_stride + 4 * p.kernel_size <= pos + 1]
            score = [0.0] * n1
            for h in range(g * group, (g + 1) * group):
                s1 = {j: scale * float(q[h, i] @ k1[j]) for j in vis1}
                pool = [scale * float(q[h, i] @ k2[j]) for j in vis2] or list(s1.values())
                lse = math.log(sum(math.exp(x) for x in pool)) if pool else 0.0
                for j in vis1:
                    score[j] += math.exp(s1[j] - lse)
            blocks = []
            for b in range(qb + 1):
                overlapping = [m for m in range(n1) if m * p.kernel_stride < (b + 1) * p.block_size
                               and m * p.kernel_stride + p.kernel_size > b * p.block_size]
                value = max((score[m] for m in overlapping), default=-math.inf)
                if b < p.init_blocks or qb - p.local_blocks <= b <= qb:
                    value = math.inf
                blocks.append((value, b))
            if len(blocks) <= p.selected:
                chosen = [b for _, b in blocks]
            else:
                chosen = sorted(b for _, b in sorted(blocks, key=lambda vb: (-vb[0], vb[1]))[: p.selected])
            results[g, i, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return results


@pytest.mark.parametrize("q_pos0, t", [(0, 40), (150, 30), (299, 1)])
def test_block_selection_matches_naive_loops(q_pos0, t):
    torch.manual_seed(q_pos0)
    p = SparseParams(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, local_blocks=2, topk=3, dense_len=0)
    length = q_pos0 + t
    q, k = torch.randn(4, t, 8), torch.randn(2, length, 8)
    k1, k2 = compress_keys_ref(k, 8, 4), compress_keys_ref(k, 32, 16)
    got = select_blocks_ref(q, k1, k2, q_pos0, p, 0.5, tile=7)
    assert torch.equal(got, naive_selection(q, k, q_pos0, p, 0.5))


def test_block_sparse_attention_matches_naive_and_dense_when_everything_is_selected():
    torch.manual_seed(1)
    q, k, v = torch.randn(4, 20, 8), torch.randn(2, 100, 8), torch.randn(2, 100, 8)
    idx = torch.full((2, 20, 3), -1, dtype=torch.int32)
    idx[0, :, 0], idx[0, :, 1], idx[1, :, 0] = 0, 5, 2
    out = block_sparse_attention_ref(q, k, v, idx, 80, 16, 0.4)
    for h in range(4):
        g = h // 2
        for i in range(20):
            pos = 80 + i
            tokens = [tok for b in idx[g, i].tolist() if b >= 0 for tok in range(b * 16, b * 16 + 16) if tok <= pos]
            w = torch.softmax(torch.stack([q[h, i] @ k[g, tok] * 0.4 for tok in tokens]), 0)
            expected = sum(w[n] * v[g, tok] for n, tok in enumerate(tokens))
            assert torch.allclose(out[h, i], expected, atol=1e-5)
    every = torch.arange(7, dtype=torch.int32).expand(2, 20, 7).contiguous()
    from salachat.kernels import dense_attention

    assert torch.allclose(block_sparse_attention_ref(q, k, v, every, 80, 16, 0.4),
                          dense_attention(q, k, v, 80, 0.4), atol=1e-5)


def test_block_sparse_attention_over_a_compact_buffer_equals_the_full_cache():
    """KV fetched into a compact buffer (block_pos names each block's origin) gives the same output."""
    torch.manual_seed(2)
    q, k, v = torch.randn(4, 20, 8), torch.randn(2, 100, 8), torch.randn(2, 100, 8)
    idx = torch.full((2, 20, 3), -1, dtype=torch.int32)
    idx[0, :, 0], idx[0, :, 1], idx[0, 10:, 2], idx[1, :, 0], idx[1, :, 1] = 0, 5, 6, 2, 6
    full = block_sparse_attention_ref(q, k, v, idx, 80, 16, 0.4)
    origin = torch.tensor([6, 0, 2, 5])  # any order: the compact buffer is what was fetched
    ck = torch.cat([torch.nn.functional.pad(k[:, b * 16 : b * 16 + 16], (0, 0, 0, 16 - k[:, b * 16 : b * 16 + 16].shape[1]))
                    for b in origin.tolist()], dim=1)
    cv = torch.cat([torch.nn.functional.pad(v[:, b * 16 : b * 16 + 16], (0, 0, 0, 16 - v[:, b * 16 : b * 16 + 16].shape[1]))
                    for b in origin.tolist()], dim=1)
    where = {b: c for c, b in enumerate(origin.tolist())}
    cidx = idx.clone().apply_(lambda b: where[b] if b >= 0 else -1)
    compact = block_sparse_attention_ref(q, ck, cv, cidx, 80, 16, 0.4, block_pos=origin)
    assert torch.allclose(compact, full, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 576), (517, 576), (3, 9, 64)])
def test_cpu_rms_norm_in_fp32_gives_the_references_bits(shape):
    """The CPU path in fp32 is torch's fused rms_norm: it must give the reference's bits, not nearly them."""
    from salachat import kernels
    from salachat.kernels.pointwise.reference import rms_norm_ref

    torch.manual_seed(len(shape))
    x, weight = torch.randn(*shape) * 3, torch.randn(shape[-1])
    assert torch.equal(kernels.rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5))
    # bf16 rounds between the normalising and the scaling (HF's order), which the fused kernel does not
    xb, wb = x.bfloat16(), weight.bfloat16()
    assert torch.equal(kernels.rms_norm(xb, wb, 1e-5), rms_norm_ref(xb, wb, 1e-5))
