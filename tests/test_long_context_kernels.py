"""The long-context attention kernel against its PyTorch reference (CPU: Triton's interpreter at small
shapes; GPU: `pytest -m gpu` at larger ones), for GQA group sizes 1, 3, 4, 7 and head dims 64 and 128."""

import pytest
import torch
from salachat.kernels.long_context import add_memory_blocks, extended_attention, rope_rows, select_memory_ref


def _call(kv_heads, per, head_dim, pos0, t, block, window, topk, dtype, device, seed=0, focus=()):
    """The arguments LongContextCache gives the kernel for t queries at pos0 over pos0 + t keys (with
    `focus` blocks added to every group's memory, as while a question is answered)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    heads, length = kv_heads * per, pos0 + t
    q = torch.randn(heads, t, head_dim, generator=g).to(dtype).to(device)
    keys = torch.randn(kv_heads, length, head_dim, generator=g).to(dtype).to(device)
    values = torch.randn(kv_heads, length, head_dim, generator=g).to(dtype).to(device)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.arange(window + block + 1, device=device).float()[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    positions = torch.arange(pos0, length, device=device)
    row_group = positions // block - pos0 // block
    n_groups = int(row_group[-1]) + 1
    group_start = ((pos0 // block + torch.arange(n_groups, device=device)) * block - window).clamp(min=0)
    rel = positions - group_start[row_group]
    q_loc = rope_rows(q, cos[rel], sin[rel])
    q_mem = rope_rows(q, cos[window + block][None], sin[window + block][None])
    sums = torch.zeros(kv_heads * per, n_groups, head_dim, device=device)
    sums.index_add_(1, row_group, q_mem.float())
    qbar = sums.view(kv_heads, per, n_groups, head_dim).transpose(1, 2)
    n_before = group_start // block
    n_blocks = int(n_before[-1])
    memory = select_memory_ref(qbar, keys[:, : n_blocks * block], n_before, 1, topk, block, head_dim**-0.5)
    if focus:
        memory = add_memory_blocks(memory, torch.tensor(focus, device=device), n_before)
    return (q_loc, q_mem, keys, values, memory, row_group, group_start, pos0, cos, sin, block,
            head_dim**-0.5)


def _check(args, atol, impl="triton"):
    ref = extended_attention(*args, impl="ref").float()
    fast = extended_attention(*args, impl=impl).float()
    err = (ref - fast).abs().max().item()
    rms = ((ref - fast).pow(2).mean() / ref.pow(2).mean()).sqrt().item()
    assert err < atol and rms < atol, f"max-abs {err:.2e}, rel-RMS {rms:.2e}"


@pytest.mark.parametrize("per", [1, 3, 4, 7], ids=lambda p: f"group{p}")
@pytest.mark.parametrize("head_dim,pos0,t", [(64, 0, 100), (64, 200, 50), (64, 245, 1), (128, 200, 50)],
                         ids=["d64-start", "d64-chunk", "d64-decode", "d128-chunk"])
def test_extended_attention_triton_matches_reference(per, head_dim, pos0, t):
    # block 16, window 32: memory blocks, a sliding local span, groups split across the call, a lone query
    args = _call(2, per, head_dim, pos0, t, block=16, window=32, topk=3, dtype=torch.float32, device="cpu")
    assert (args[4][:, -1] >= 0).sum() > 1  # the last group really reads selected memory blocks
    _check(args, 2e-4)


@pytest.mark.parametrize("per", [1, 3, 4, 7], ids=lambda p: f"group{p}")
@pytest.mark.parametrize("head_dim,pos0,t", [(64, 0, 100), (64, 200, 50), (64, 245, 1), (128, 200, 50)],
                         ids=["d64-start", "d64-chunk", "d64-decode", "d128-chunk"])
def test_extended_attention_cpu_matches_reference(per, head_dim, pos0, t):
    args = _call(2, per, head_dim, pos0, t, block=16, window=32, topk=3, dtype=torch.float32, device="cpu")
    assert (args[4][:, -1] >= 0).sum() > 1
    _check(args, 1e-5, impl="cpu")


@pytest.mark.parametrize("impl", ["triton", "cpu"])
def test_focus_blocks_join_every_group_memory_once_and_only_before_its_span(impl):
    args = _call(2, 3, 64, 200, 50, block=16, window=32, topk=1, dtype=torch.float32, device="cpu",
                 focus=(2, 3, 11))
    memory, n_before = args[4], args[6] // 16
    assert memory.shape[-1] == 2 + 3
    for h in range(2):
        for g in range(memory.shape[1]):
            listed = [b for b in memory[h, g].tolist() if b >= 0]
            assert len(listed) == len(set(listed)) and all(b < n_before[g] for b in listed)
            assert {2, 3, 11} & set(range(int(n_before[g]))) <= set(listed)
    with_11 = (memory == 11).any(-1)
    assert bool(with_11.any()) and not bool(with_11.all())  # block 11 joins only once the spans pass it
    _check(args, 2e-4 if impl == "triton" else 1e-5, impl=impl)


def test_extended_attention_cpu_with_a_head_that_has_no_memory():
    args = list(_call(2, 3, 64, 200, 50, block=16, window=32, topk=3, dtype=torch.float32, device="cpu"))
    memory = args[4].clone()
    memory[1] = -1  # the second KV head attends its local span only
    args[4] = memory
    _check(tuple(args), 1e-5, impl="cpu")


def test_selection_takes_the_block_one_head_attends_to_and_never_the_local_span():
    kv, per, d, block = 1, 3, 8, 4
    keys = torch.zeros(kv, 10 * block, d)
    keys[0, 6 * block + 1, 0] = 4.0  # block 6 holds the key that head 2 looks for
    keys[0, 8 * block, 0] = 9.0  # block 8 matches better, but lies in the local span of group 0
    keys[0, 3 * block : 4 * block, 1] = 1.0  # block 3: a mild match for heads 0 and 1 over all its keys
    qbar = torch.zeros(kv, 2, per, d)
    qbar[0, :, 2, 0] = 1.0
    qbar[0, :, :2, 1] = 1.0
    n_before = torch.tensor([8, 10])
    memory = select_memory_ref(qbar, keys, n_before, init_blocks=1, topk=2, block=block, scale=1.0)
    assert memory[0, 0].tolist() == [0, 3, 6]
    assert memory[0, 1].tolist() == [0, 6, 8]
    early = select_memory_ref(qbar, keys, torch.tensor([0, 2]), init_blocks=1, topk=2, block=block, scale=1.0)
    assert early[0].tolist() == [[-1, -1, -1], [0, 1, -1]]


@pytest.mark.gpu
@pytest.mark.parametrize("per", [1, 3, 4, 7], ids=lambda p: f"group{p}")
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("pos0,t", [(0, 4096), (20000, 2000), (65535, 1)], ids=["dense", "chunk", "decode"])
def test_extended_attention_triton_matches_reference_on_gpu(per, head_dim, pos0, t):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    args = _call(3, per, head_dim, pos0, t, block=128, window=4096, topk=16, dtype=torch.bfloat16,
                 device="cuda")
    _check(args, 2e-2)
