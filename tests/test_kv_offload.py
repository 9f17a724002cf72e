"""Sparse KV kept mostly in host memory and fetched when selected gives exactly what an all-resident cache gives,
while the device holds a bounded tail; its state saves, resumes and round-trips like the resident cache."""

import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from sala_tiny import write_tiny_checkpoint
from salachat.engine.cache import ModelCache
from salachat.engine.kv_offload import HEADROOM_BLOCKS, OffloadedKV
from salachat.engine.loader import load_model
from salachat.engine.sparse_cache import SparseKVCache, limit_device_kv
from salachat.kernels import SparseParams

TEXT = ("The harbour light of Varna Point was built in 1871. Tomas Brandt kept it for thirty-one years, "
        "and his daughter Ilse kept the log. ")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("sala") / "tiny")
    return load_model(str(folder), device="cpu", dtype=torch.float32)


def budgeted(loaded, resident_blocks: int | None) -> ModelCache:
    cache = loaded.new_cache()
    for layer in cache.layers:
        if isinstance(layer, SparseKVCache):
            layer.set_resident_blocks(resident_blocks)
    return cache


def sparse_layers(cache: ModelCache) -> list[SparseKVCache]:
    return [layer for layer in cache.layers if isinstance(layer, SparseKVCache)]


def assert_same_state(a: ModelCache, b: ModelCache) -> None:
    ta, ma = a.state()
    tb, mb = b.state()
    assert ma == mb and ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


IDS = torch.randint(5, 320, (260,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("resident_blocks", [1, 2])
def test_offloaded_logits_equal_resident_one_shot_chunked_and_token_by_token(tiny, resident_blocks):
    p = tiny.model.args.sparse
    assert len(IDS) > 2 * p.dense_len and p.topk + p.local_blocks < len(IDS) // p.block_size  # real selection
    expected_cache = tiny.new_cache()
    expected = tiny.model(IDS, expected_cache)

    cache = budgeted(tiny, resident_blocks)
    assert torch.equal(tiny.model(IDS, cache), expected)
    assert_same_state(cache, expected_cache)

    rng = random.Random(resident_blocks)
    cache, outs, begin = budgeted(tiny, resident_blocks), [], 0
    while begin < len(IDS):
        size = rng.randint(1, 70)
        outs.append(tiny.model(IDS[begin : begin + size], cache))
        begin += size
    chunked = torch.cat(outs)
    reference, outs, begin, rng = tiny.new_cache(), [], 0, random.Random(resident_blocks)
    while begin < len(IDS):  # the same chunks on an all-resident cache: chunking alone moves the last bits
        size = rng.randint(1, 70)
        outs.append(tiny.model(IDS[begin : begin + size], reference))
        begin += size
    assert torch.equal(chunked, torch.cat(outs))

    cache, reference, fetched = budgeted(tiny, resident_blocks), tiny.new_cache(), 0
    for i in range(len(IDS)):
        assert torch.equal(tiny.model(IDS[i : i + 1], cache), tiny.model(IDS[i : i + 1], reference)), i
        for layer in sparse_layers(cache):  # the device never holds more than the budget
            assert layer.offloaded.tail.shape[2] == (resident_blocks + HEADROOM_BLOCKS) * p.block_size
            assert layer.keys.numel() == 0
            assert layer.offloaded._hot.shape[2] <= p.selected * 2  # last step's fetches: one selection a head
    fetched = sum(layer.offloaded.fetched_blocks for layer in sparse_layers(cache))
    assert fetched > 0  # selection did reach blocks that were only in host memory
    assert sum(layer.offloaded.reused_blocks for layer in sparse_layers(cache)) > 0  # and kept them a step
    assert_same_state(cache, reference)


def test_dense_prefix_is_fetched_once_it_left_the_device():
    """Queries before dense_len read every key; with a budget smaller than dense_len some come from the host."""
    torch.manual_seed(3)
    params = SparseParams(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, local_blocks=2, topk=3,
                          dense_len=120)
    full = SparseKVCache(2, 8, params, torch.float32, "cpu")
    small = SparseKVCache(2, 8, params, torch.float32, "cpu", resident_blocks=1)
    pos = 0
    for size in (50, 40, 1, 1, 1, 30, 7, 100, 1, 1):
        q, k, v = torch.randn(4, size, 8), torch.randn(2, size, 8), torch.randn(2, size, 8)
        assert torch.equal(small.attend(q, k, v, pos, 0.3), full.attend(q, k, v, pos, 0.3)), pos
        pos += size
        assert small.offloaded.tail.shape[2] == (1 + HEADROOM_BLOCKS) * 16  # trimmed after the 100-token chunk
    assert small.offloaded.tail_start > 0 and small.offloaded.fetched_blocks > 0


@pytest.mark.parametrize("hot_limit", [4, 512])
def test_a_prefill_chunk_reads_its_blocks_the_same_through_a_span_copy_or_a_gather(monkeypatch, hot_limit):
    """A chunk whose selection covers most of the host-only span copies the span up whole (hot_limit 4 makes
    every chunk here do that); attention over it equals the all-resident cache, and so does decode after."""
    monkeypatch.setattr(OffloadedKV, "HOT_LIMIT_BLOCKS", hot_limit)
    torch.manual_seed(4)
    params = SparseParams(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, local_blocks=2, topk=6,
                          dense_len=40)
    full = SparseKVCache(2, 8, params, torch.float32, "cpu")
    small = SparseKVCache(2, 8, params, torch.float32, "cpu", resident_blocks=2)
    pos = 0
    for size in (200, 150, 120, 1, 1, 90):
        q, k, v = torch.randn(4, size, 8), torch.randn(2, size, 8), torch.randn(2, size, 8)
        assert torch.equal(small.attend(q, k, v, pos, 0.3), full.attend(q, k, v, pos, 0.3)), pos
        pos += size
    assert small.offloaded.fetched_blocks > 0


def test_state_round_trips_with_and_without_a_budget(tiny):
    cache = budgeted(tiny, 2)
    tiny.model(IDS[:200], cache)
    tensors, meta = cache.state()
    assert all(not t.is_cuda for t in tensors.values())
    # into a budgeted cache, an unbudgeted one, and a budget changed on a filled cache: all continue alike
    layers = [SparseKVCache.from_state({n[len(f"layers.{i}."):]: t for n, t in tensors.items()
                                        if n.startswith(f"layers.{i}.")}, m, resident_blocks=1)
              if m["kind"] == "sparse_kv" else None for i, m in enumerate(meta["layers"])]
    restored = ModelCache.from_state(tensors, meta)
    budgeted_restored = ModelCache.from_state(tensors, meta)
    budgeted_restored.layers = [a or b for a, b in zip(layers, budgeted_restored.layers)]
    assert sparse_layers(budgeted_restored)[0].resident_blocks == 1
    assert sparse_layers(restored)[0].resident_blocks is None
    changed = ModelCache.from_state(tensors, meta)
    assert limit_device_kv(changed, 1e-4) >= 1
    expected = tiny.model(IDS[200:], cache)
    for other in (restored, budgeted_restored, changed):
        assert torch.equal(tiny.model(IDS[200:], other), expected)
        assert_same_state(other, cache)
    limit_device_kv(changed, None)
    assert sparse_layers(changed)[0].offloaded is None and sparse_layers(changed)[0].keys.shape[1] >= len(IDS)
    assert_same_state(changed, cache)


def test_a_budget_below_one_block_is_one_clear_error(tiny):
    with pytest.raises(ValueError, match="give a larger budget"):
        limit_device_kv(tiny.new_cache(), 1e-9)


def test_session_read_with_offload_saves_incrementally_and_resumes_exactly(tiny, tmp_path):
    from salachat.conversation import Conversation
    from salachat.sessions import SessionWriter, load_conversation

    plain, offloaded = Conversation(tiny, chunk_size=64), Conversation(tiny, chunk_size=64)
    assert limit_device_kv(offloaded.cache, 5e-5) == 2
    writer = SessionWriter(tmp_path / "s", documents=[])
    for conversation in (plain, offloaded):
        conversation.set_documents(TEXT)
    plain.read()
    offloaded.read(on_chunk=writer.save)
    writer.save(offloaded)
    assert offloaded.cache.position > tiny.model.args.sparse.dense_len
    assert len(writer.manifest["cache"]["tensors"]["layers.0.keys"]["segments"]) > 1  # appended, not rewritten
    restored, _ = load_conversation(tmp_path / "s", tiny)
    assert_same_state(restored.cache, plain.cache)
    limit_device_kv(restored.cache, 5e-5)
    assert sum(layer.offloaded.fetched_blocks for layer in sparse_layers(offloaded.cache)) > 0
    probe = torch.tensor([5, 17, 42, 99])
    assert torch.equal(tiny.model(probe, restored.cache), tiny.model(probe, plain.cache))


def test_offload_bench_smoke_measures_both_and_writes_json(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    import offload_bench

    out = tmp_path / "offload.json"
    result = offload_bench.main(["--device", "cpu", "--smoke", "--steps", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["decode_ms"].keys() == {"resident", "offloaded", "offloaded_drifting"}
    assert saved["layer_kv_gpu_bytes"]["offloaded"] < saved["layer_kv_gpu_bytes"]["resident"] / 2
    assert result["fetched_blocks_per_step"] > 0 and result["model_gpu_gb_saved_9b"] > 0


def test_kv_gpu_budget_from_the_loader_applies_to_new_and_resumed_caches(tiny, tmp_path, monkeypatch):
    """`salachat --kv-gpu-gb X` reaches the engine through SALACHAT_KV_GPU_GB: every new cache and every
    resumed session (loaded straight into host memory) keeps only the budget's blocks on the device, with the
    same logits; a budget below one block is one clear error at load time."""
    from salachat.engine.loader import ModelLoadError

    from salachat.conversation import Conversation
    from salachat.sessions import SessionWriter, load_conversation

    folder = Path(tiny.model_id)
    monkeypatch.setenv("SALACHAT_KV_GPU_GB", "5e-5")
    budgeted = load_model(str(folder), device="cpu", dtype=torch.float32)
    assert budgeted.kv_gpu_gb == 5e-5
    assert all(layer.resident_blocks == 2 for layer in sparse_layers(budgeted.new_cache()))
    plain = Conversation(tiny, chunk_size=64)
    plain.set_documents(TEXT)
    plain.read()
    writer = SessionWriter(tmp_path / "s", documents=[])
    writer.save(plain)
    restored, _ = load_conversation(tmp_path / "s", budgeted)
    assert all(layer.resident_blocks == 2 for layer in sparse_layers(restored.cache))
    probe = torch.tensor([5, 17, 42, 99])
    assert torch.equal(budgeted.model(probe, restored.cache), tiny.model(probe, plain.cache))
    monkeypatch.setenv("SALACHAT_KV_GPU_GB", "0")
    with pytest.raises(ModelLoadError, match="below this model's minimum"):
        load_model(str(folder), device="cpu", dtype=torch.float32)
