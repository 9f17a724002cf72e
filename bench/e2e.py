"""End-to-end speed of the 9B MiniCPM-SALA config on one GPU, against dense baselines measured in the same run.

Random bf16 weights (speed does not need the real ones). For each context length: prefill time, decode
ms/token (mean of 64 tokens after 3 warm-up tokens), peak GPU memory. Models:
  sala        the hybrid: 24 Lightning layers + 8 InfLLM-V2 sparse layers (kernels on CUDA), read in chunks
              (each of --chunks is timed; the best is the hybrid's figure)
  sala-dense  the same model with every sparse layer forced to dense attention
  dense       the baseline: a dense Transformer of the same size, all 32 layers GQA softmax attention, read as
              fast as this GPU reads it: in one shot (one causal flash-attention call a layer) where memory
              allows, else in the largest chunks that fit (each half the last that ran out of memory)
Prefill computes the logits of the last token only (what reading needs; all the logits of a 16K-token chunk
are 4.8 GB). A run past --time-cap seconds or out of memory is reported as such. Also: device-to-device copy
bandwidth and the decode bandwidth bound. --quant nf4|int8 quantises the SALA models' linear layers;
--kv-gpu-gb keeps that much of the sparse layers' K/V on the GPU (the rest in host memory, as the CLI's
option does); --memory-cap-gb caps this process's GPU memory (torch.cuda.set_per_process_memory_fraction),
set before the model is built, so the cap holds the whole run.

    python bench/e2e.py --models sala dense --contexts 262144 --chunks 16384 32768 65536 --out bench/results/e2e.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
from pathlib import Path

import torch

SALA_9B = {
    "model_type": "minicpm_sala", "vocab_size": 73448, "hidden_size": 4096, "intermediate_size": 16384,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128,
    "lightning_nh": 32, "lightning_nkv": 32, "lightning_head_dim": 128, "lightning_scale": "1/sqrt(d)",
    "lightning_use_rope": True, "attn_use_rope": False, "qk_norm": True, "use_output_norm": True,
    "use_output_gate": True, "attn_use_output_gate": True, "attention_bias": False, "hidden_act": "silu",
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 524288,
    "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": [2, 73440], "lightning_layerwise_decay": False,
    "mixer_types": [
        "minicpm4" if i in (0, 9, 16, 17, 22, 29, 30, 31) else "lightning-attn" for i in range(32)
    ],
    "sparse_config": {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
                      "window_size": 2048, "topk": 64, "use_nope": False, "dense_len": 8192},
}
DENSE_9B = {  # MiniCPM4-8B-shaped full-attention Transformer: same width, depth, heads and GQA as SALA's softmax layers
    "model_type": "llama", "vocab_size": 73448, "hidden_size": 4096, "intermediate_size": 16384,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 1 << 21, "tie_word_embeddings": False,
}


def shrink(config: dict) -> dict:
    """A CPU-sized version of a config, for a smoke test of this script (--smoke)."""
    small = {**config, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "head_dim": 32,
             "vocab_size": 512, "lightning_nh": 4, "lightning_nkv": 4, "lightning_head_dim": 32}
    if "sparse_config" in config:
        small["sparse_config"] = {**config["sparse_config"], "dense_len": 256, "window_size": 128, "topk": 4}
    return small


SMOKE = False


def build(name: str, device: str):
    torch.manual_seed(0)
    if name == "dense":
        from salachat.engine.models.llama import LlamaArgs, LlamaForCausalLM

        args, cls = LlamaArgs.from_config(shrink(DENSE_9B) if SMOKE else DENSE_9B), LlamaForCausalLM
    else:
        from salachat.engine.models.sala import SalaArgs, SalaForCausalLM

        config = copy.deepcopy(shrink(SALA_9B) if SMOKE else SALA_9B)
        if name == "sala-dense":
            config["sparse_config"]["dense_len"] = 1 << 40  # every query takes the dense path
        args, cls = SalaArgs.from_config(config), SalaForCausalLM
    default = torch.get_default_dtype()
    if name != "dense":  # built in bf16 (an fp32 SALA is 38 GB before its cast, over a 24 GB cap); the Llama
        torch.set_default_dtype(torch.bfloat16)  # model's RoPE frequencies are made at init and stay fp32
    try:
        with torch.device(device):
            model = cls(args).to(torch.bfloat16)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():  # small random weights keep activations finite through 32 layers
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    if name != "dense":
        model.fuse_projections()  # as loading a checkpoint does (engine/models/sala.py)
    model.lm_head = LastRowHead(model.lm_head)  # (a tied head stays tied: the wrapped module is the same)
    return model.eval()


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read and written."""
    src = torch.empty(1 << (31 if device == "cuda" else 27), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync(device)
    bw = 2 * src.numel() * 10 / (time.perf_counter() - t)
    del src, dst
    return bw


def cache_read_bytes_per_token(cache) -> int:
    """State bytes a decode step must read: every Lightning state, every compressed key (the selection scores
    them all), and of the sparse layers' K/V only the selected blocks (a dense KV cache is read whole)."""
    total = 0
    for layer in cache.layers:
        params = getattr(layer, "params", None)
        for name, t in layer.state().items():
            if params is not None and name in ("keys", "values"):
                tokens = min(t.shape[1], params.selected * params.block_size)
                if layer.length + 1 < params.dense_len:
                    tokens = t.shape[1]
                total += t.shape[0] * tokens * t.shape[2] * t.element_size()
            else:
                total += t.numel() * t.element_size()
    return total


class LastRowHead(torch.nn.Module):
    """The LM head applied to the last row only: reading needs the last token's logits alone."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head = head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h[-1:])


def forward_last(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """One chunk through the model; the logits of its last token."""
    return model(ids, cache)[-1]


class OverTime(Exception):
    pass


def read(model, ids: torch.Tensor, cache, chunk: int, deadline: float) -> torch.Tensor:
    logits = None
    for begin in range(0, ids.shape[0], chunk):
        if time.perf_counter() > deadline:
            raise OverTime(begin)
        logits = forward_last(model, ids[begin : begin + chunk], cache)
    return logits


def profile_table(prof, path: Path, what: str) -> None:
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    # where the host's time goes too: a decode step whose GPU work is shorter than its wall time waits on it
    host = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    path.write_text(f"{what}\nCUDA kernels: {kernels}, GPU time {gpu_us / 1e3:.2f} ms\n\n{table}\n\nBy host time:\n{host}")
    print(f"profile → {path}: {kernels} kernels, {gpu_us / 1e3:.2f} ms of GPU time")


def profile_decode(model, cache, token, path: Path) -> None:
    """Where a decode step's time goes: the profiler's table for 3 steps (CUDA kernels and CPU ops)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            token = model(token, cache)[-1].argmax().view(1)
        torch.cuda.synchronize()
    profile_table(prof, path, f"3 decode steps at {cache.position} tokens")


def profile_prefill_chunk(model, cache, chunk: int, vocab: int, path: Path) -> None:
    """One more prefill chunk at the end of the context, profiled."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(vocab // 100, vocab - 1, (chunk,), device="cuda")
    start = cache.position
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        forward_last(model, ids, cache)
        torch.cuda.synchronize()
    profile_table(prof, path, f"one prefill chunk of {chunk} tokens at positions {start}..{cache.position - 1}")


def fresh_cache(model, kv_gpu_gb: float | None):
    cache = model.new_cache()
    if kv_gpu_gb is not None:
        from salachat.engine.sparse_cache import limit_device_kv

        limit_device_kv(cache, kv_gpu_gb)
    return cache


def peaks(device: str) -> tuple[float | None, float | None]:
    if device != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30


def warm_up(model, chunks: list[int], device: str, kv_gpu_gb: float | None) -> float:
    """Read past dense_len in each chunk size and decode a few tokens, untimed: the first reading of a process
    compiles the Triton kernels (seconds), which a timed reading must not include (Triton keeps them on disk,
    so a user's later runs do not pay it either). Returns the seconds it took."""
    start = time.perf_counter()
    vocab = model.model.embed_tokens.num_embeddings
    sparse = getattr(model.args, "sparse", None)
    dense_len = sparse.dense_len if sparse is not None else 8192
    for chunk in chunks:
        length = dense_len + 2 * chunk
        ids = torch.randint(vocab // 100, vocab - 1, (length,), device=device)
        cache = fresh_cache(model, kv_gpu_gb)
        try:
            logits = read(model, ids, cache, chunk, float("inf"))
            token = logits.argmax().view(1)
            for _ in range(3):
                token = model(token, cache)[-1].argmax().view(1)
            sync(device)
        except torch.OutOfMemoryError:
            pass  # the timed reading finds this chunk's limit itself
        del cache
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return time.perf_counter() - start


def run_one(model, context: int, chunks: list[int], decode_tokens: int, time_cap: float, device: str,
            kv_gpu_gb: float | None = None, profile_to: Path | None = None, smallest: int = 1024) -> dict:
    """Read `context` random tokens in each of `chunks` (a chunk that runs out of memory is tried again in
    halves, down to `smallest`) and report the best; then decode from the last cache read (the same contents
    whatever the chunk). Each reading starts from an empty cache with the previous one freed, so its peak
    memory is its own."""
    vocab = model.model.embed_tokens.num_embeddings
    ids = torch.randint(vocab // 100, vocab - 1, (context,), device=device)
    tried, read_ok = {}, {}
    cache = logits = None
    queue = list(chunks)

    def note(chunk: int, outcome) -> None:
        tried[chunk] = outcome
        print(f"  {context} tokens in chunks of {chunk}: "
              + (f"{outcome:.1f} s" if isinstance(outcome, float) else outcome), flush=True)

    while queue:
        chunk = queue.pop(0)
        cache = logits = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        attempt = fresh_cache(model, kv_gpu_gb)
        start = time.perf_counter()
        try:
            logits = read(model, ids, attempt, chunk, start + time_cap)
            sync(device)
        except OverTime as e:
            note(chunk, f"over the {time_cap:.0f} s cap after {e.args[0]} tokens")
            continue
        except torch.OutOfMemoryError:
            note(chunk, "out of memory")
            smaller = chunk // 2
            if smaller >= smallest and smaller not in queue and smaller not in tried:
                queue.insert(0, smaller)
            continue
        finally:
            if logits is None:
                del attempt
        cache = attempt
        note(chunk, time.perf_counter() - start)
        read_ok[chunk] = (tried[chunk], *peaks(device))
    if not read_ok:
        return {"status": "; ".join(f"chunk {c}: {r}" for c, r in tried.items()), "chunks_tried": tried}
    chunk = min(read_ok, key=lambda c: read_ok[c][0])
    if cache is None:  # the last size tried failed: read again at the best one to decode from it
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        cache = fresh_cache(model, kv_gpu_gb)
        logits = read(model, ids, cache, chunk, float("inf"))
    prefill_s, prefill_peak, prefill_reserved = read_ok[chunk]
    token = logits.argmax().view(1)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(3):  # warm-up steps
            token = model(token, cache)[-1].argmax().view(1)
        sync(device)
        t = time.perf_counter()
        for _ in range(decode_tokens):
            token = model(token, cache)[-1].argmax().view(1)
        sync(device)
        decode_ms = (time.perf_counter() - t) / decode_tokens * 1000
    except torch.OutOfMemoryError:
        return {"status": "out of memory in decode", "prefill_seconds": prefill_s, "chunk": chunk,
                "chunks_tried": tried}
    decode_peak, decode_reserved = peaks(device)
    result = {
        "status": "ok", "chunk": chunk, "chunks_tried": tried, "prefill_seconds": prefill_s,
        "prefill_tokens_per_second": context / prefill_s, "decode_ms_per_token": decode_ms,
        "prefill_plus_decode_seconds": prefill_s + decode_ms * decode_tokens / 1000,
        "peak_memory_gib": None if prefill_peak is None else max(prefill_peak, decode_peak),
        "peak_reserved_gib": None if prefill_reserved is None else max(prefill_reserved, decode_reserved),
        "state_bytes": cache_read_bytes_per_token(cache),
    }
    if profile_to is not None:
        profile_decode(model, cache, token, profile_to.with_name(profile_to.name + "_decode_profile.txt"))
        profile_prefill_chunk(model, cache, min(chunks), vocab,
                              profile_to.with_name(profile_to.name + "_prefill_chunk_profile.txt"))
    del cache
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["sala", "dense"], choices=["sala", "sala-dense", "dense"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[32768, 262144, 1048576])
    parser.add_argument("--chunks", nargs="+", type=int, default=[16384],
                        help="prefill chunk sizes for the SALA models (each is timed, the best kept)")
    parser.add_argument("--min-chunk", type=int, default=None,
                        help="a chunk that runs out of memory is tried in halves down to this (default: the "
                             "smallest of --chunks)")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--time-cap", type=float, default=300.0, help="seconds for one prefill")
    parser.add_argument("--quant", default=None, choices=["nf4", "int8"], help="quantise the SALA models")
    parser.add_argument("--kv-gpu-gb", type=float, default=None,
                        help="GPU memory for the sparse layers' K/V (the rest in host memory)")
    parser.add_argument("--memory-cap-gb", type=float, default=None, help="cap this process's GPU memory")
    parser.add_argument("--out", default="bench/results/e2e.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    parser.add_argument("--profile", action="store_true",
                        help="profile a decode step and a prefill chunk at the longest context (CUDA)")
    args = parser.parse_args(argv)
    global SMOKE
    SMOKE = args.smoke
    device = "cpu" if args.smoke else "cuda"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke test)"
    report = {"device": name, "torch": torch.__version__, "chunks": args.chunks, "quant": args.quant,
              "kv_gpu_gb": args.kv_gpu_gb, "memory_cap_gb": args.memory_cap_gb,
              "decode_tokens": args.decode_tokens, "time_cap_seconds": args.time_cap, "runs": {}}
    report["copy_bandwidth_bytes_per_second"] = bw = copy_bandwidth(device)
    print(f"{report['device']}: device-to-device copy {bw / 1e12:.2f} TB/s")
    if args.memory_cap_gb and device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb * 2**30 / total))
        print(f"GPU memory capped at {args.memory_cap_gb} GiB of {total / 2**30:.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        sala = name.startswith("sala")
        try:
            model = build(name, device)
            if args.quant and sala:
                from salachat.engine.quant import quantize_linears

                quantize_linears(model, args.quant, skip=("lm_head", "lm_head.head"))  # the head stays bf16
                name = f"{name}-{args.quant}"
        except torch.OutOfMemoryError:
            report["runs"][name] = {"status": "out of memory while building the model", "contexts": {}}
            print(name, "does not fit: out of memory while building the model")
            gc.collect()
            torch.cuda.empty_cache()
            continue
        from salachat.engine.quant import weight_bytes as stored_bytes

        wbytes = stored_bytes(model) + sum(b.numel() * b.element_size() for b in model.buffers())
        # a decoded token reads every weight once but of an input embedding that is not also the LM head only
        # its own row: the bound counts the table out (it was counted in before: 0.6 GB of the 9B's 19 GB)
        embed = model.model.embed_tokens.weight
        head = getattr(model.lm_head, "head", model.lm_head)  # LastRowHead wraps it
        tied = embed.data_ptr() == head.weight.data_ptr()
        decode_wbytes = wbytes - (0 if tied else embed.numel() * embed.element_size())
        report["runs"][name] = {"weight_bytes": wbytes, "decode_weight_bytes": decode_wbytes, "contexts": {}}
        if sala or device == "cuda":
            chunks = args.chunks if sala else [8192]
            report["runs"][name]["warm_up_seconds"] = w = warm_up(model, chunks, device, args.kv_gpu_gb if sala else None)
            print(f"{name}: warm-up (kernels compiled, untimed) {w:.1f} s", flush=True)
        failed = False
        for context in args.contexts:
            if failed:
                report["runs"][name]["contexts"][context] = {"status": "skipped: a shorter context already failed"}
                continue
            profile_to = None
            if args.profile and device == "cuda" and context == args.contexts[-1]:
                profile_to = out.with_name(f"{out.stem}_{name}_{context}")
            # the baseline reads in one shot where memory allows, then in halves down to the smallest chunk
            chunks = args.chunks if sala else [context]
            r = run_one(model, context, chunks, args.decode_tokens, args.time_cap, device,
                        args.kv_gpu_gb if sala else None, profile_to, smallest=args.min_chunk or min(args.chunks))
            if r["status"] == "ok":
                bound_ms = (decode_wbytes + r["state_bytes"]) / bw * 1000
                r["decode_bound_ms"] = bound_ms
                r["decode_ratio_to_bound"] = r["decode_ms_per_token"] / bound_ms
            else:
                failed = True
            report["runs"][name]["contexts"][context] = r
            print(name, context, json.dumps(r), flush=True)
            out.write_text(json.dumps(report, indent=2))
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        out.write_text(json.dumps(report, indent=2))
    print_table(report)  # adds each model's speed-up over the dense baseline
    out.write_text(json.dumps(report, indent=2))
    return report


def print_table(report: dict) -> None:
    dense = report["runs"].get("dense", {}).get("contexts", {})
    print(f"\n{'model':<14} {'context':>9} {'chunk':>7} {'prefill s':>10} {'decode ms':>10} {'x bound':>8} "
          f"{'+64 s':>8} {'vs dense':>9} {'peak GiB':>9}  status")
    for name, run in report["runs"].items():
        for context, r in run["contexts"].items():
            if r["status"] != "ok":
                print(f"{name:<14} {int(context):>9} {'-':>7} {'-':>10} {'-':>10} {'-':>8} {'-':>8} {'-':>9} {'-':>9}"
                      f"  {r['status']}")
                continue
            peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
            base = dense.get(context, {})
            ratio = "-"
            if name != "dense" and base.get("status") == "ok":
                ratio = f"{base['prefill_plus_decode_seconds'] / r['prefill_plus_decode_seconds']:.2f}x"
                r["speedup_vs_dense"] = base["prefill_plus_decode_seconds"] / r["prefill_plus_decode_seconds"]
            print(f"{name:<14} {int(context):>9} {r['chunk']:>7} {r['prefill_seconds']:>10.1f} "
                  f"{r['decode_ms_per_token']:>10.2f} {r.get('decode_ratio_to_bound', 0):>8.2f} "
                  f"{r['prefill_plus_decode_seconds']:>8.1f} {ratio:>9} {peak:>9}  ok")


if __name__ == "__main__":
    main()
