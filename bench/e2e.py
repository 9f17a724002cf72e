"""End-to-end speed of the 9B MiniCPM-SALA config on one GPU, against dense baselines measured in the same run.

Random bf16 weights (speed does not need the real ones). For each context length: prefill time (chunked, as
salachat reads), decode ms/token (mean of 64 tokens after the prefill), peak GPU memory. Models:
  sala        the hybrid: 24 Lightning layers + 8 InfLLM-V2 sparse layers (kernels on CUDA)
  sala-dense  baseline 1: the same model with every sparse layer forced to dense attention (SDPA)
  dense       baseline 2: a dense Transformer of the same size, all 32 layers GQA softmax attention (SDPA)
A run past --time-cap seconds or out of memory is reported as such. Also: device-to-device copy bandwidth and
the decode memory-bandwidth bound; with --quant nf4, weight bytes and decode speed of the quantised model.

    python bench/e2e.py --models sala sala-dense dense --contexts 32768 131072 262144 --out bench/results/e2e.json
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
    with torch.device(device):
        model = cls(args).to(torch.bfloat16)
    with torch.no_grad():  # small random weights keep activations finite through 32 layers
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
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


def profile_decode(model, cache, token, path: Path) -> None:
    """Where a decode step's time goes: the profiler's table for 3 steps (CUDA kernels and CPU ops)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            token = model(token, cache)[-1].argmax().view(1)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    kernels = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
    path.write_text(f"CUDA kernel launches in 3 decode steps: {kernels}\n\n{table}")
    print(f"decode profile → {path}: {kernels / 3:.0f} kernel launches per token")


def run_one(model, context: int, chunk: int, decode_tokens: int, time_cap: float, device: str,
            profile_to: Path | None = None) -> dict:
    from salachat.engine.generate import Cancelled, prefill

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cache = model.new_cache()
    vocab = model.model.embed_tokens.num_embeddings
    ids = torch.randint(vocab // 100, vocab - 1, (context,), device=device)
    start = time.perf_counter()

    def too_slow() -> bool:
        return time.perf_counter() - start > time_cap

    try:
        logits = prefill(model, ids, cache, chunk_size=chunk, should_stop=too_slow)
        sync(device)
    except Cancelled:
        return {"status": f"over time cap ({time_cap:.0f} s) after {cache.position} tokens",
                "prefill_tokens_done": cache.position, "seconds_so_far": time.perf_counter() - start}
    except torch.OutOfMemoryError:
        del cache
        return {"status": "out of memory in prefill"}
    prefill_s = time.perf_counter() - start
    token = logits.argmax().view(1)
    try:
        for _ in range(3):  # warm-up steps
            token = model(token, cache)[-1].argmax().view(1)
        sync(device)
        t = time.perf_counter()
        for _ in range(decode_tokens):
            token = model(token, cache)[-1].argmax().view(1)
        sync(device)
        decode_ms = (time.perf_counter() - t) / decode_tokens * 1000
        if profile_to is not None:
            profile_decode(model, cache, token, profile_to)
    except torch.OutOfMemoryError:
        return {"status": "out of memory in decode", "prefill_seconds": prefill_s}
    result = {
        "status": "ok", "prefill_seconds": prefill_s, "prefill_tokens_per_second": context / prefill_s,
        "decode_ms_per_token": decode_ms, "prefill_plus_decode_seconds": prefill_s + decode_ms * decode_tokens / 1000,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "state_bytes": cache_read_bytes_per_token(cache),
    }
    del cache
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["sala", "sala-dense", "dense"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[32768, 131072, 262144, 524288, 1048576])
    parser.add_argument("--chunk", type=int, default=16384)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--time-cap", type=float, default=300.0)
    parser.add_argument("--quant", default=None, help="also measure the sala model quantised (nf4|int8)")
    parser.add_argument("--quant-context", type=int, default=32768)
    parser.add_argument("--out", default="bench/results/e2e.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    parser.add_argument("--profile", action="store_true", help="profile decode at the longest context (CUDA)")
    args = parser.parse_args()
    global SMOKE
    SMOKE = args.smoke
    device = "cpu" if args.smoke else "cuda"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke test)"
    report = {"device": name, "torch": torch.__version__, "chunk": args.chunk,
              "decode_tokens": args.decode_tokens, "time_cap_seconds": args.time_cap, "runs": {}}
    report["copy_bandwidth_bytes_per_second"] = bw = copy_bandwidth(device)
    print(f"{report['device']}: device-to-device copy {bw / 1e12:.2f} TB/s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        model = build(name, device)
        wbytes = weight_bytes(model)
        report["runs"][name] = {"weight_bytes": wbytes, "contexts": {}}
        failed = False
        for context in args.contexts:
            if failed:
                report["runs"][name]["contexts"][context] = {"status": "skipped: a shorter context already failed"}
                continue
            profile_to = None
            if args.profile and device == "cuda" and context == args.contexts[-1]:
                profile_to = out.with_name(f"{out.stem}_{name}_{context}_decode_profile.txt")
            r = run_one(model, context, args.chunk, args.decode_tokens, args.time_cap, device, profile_to)
            if r["status"] == "ok":
                bound_ms = (wbytes + r["state_bytes"]) / bw * 1000
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
        if args.quant and name == "sala":
            from salachat.engine.quant import quantize_linears

            quantize_linears(model, args.quant)
            qbytes = sum(b.numel() * b.element_size() for b in list(model.parameters()) + list(model.buffers()))
            r = run_one(model, args.quant_context, args.chunk, args.decode_tokens, args.time_cap, device)
            r["weight_bytes"] = qbytes
            report["runs"][f"sala-{args.quant}"] = {"weight_bytes": qbytes, "contexts": {args.quant_context: r}}
            print(f"sala-{args.quant}", args.quant_context, json.dumps(r), flush=True)
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        out.write_text(json.dumps(report, indent=2))
    print_table(report)


def print_table(report: dict) -> None:
    print(f"\n{'model':<12} {'context':>9} {'prefill s':>10} {'tok/s':>9} {'decode ms':>10} {'x bound':>8} {'peak GiB':>9}  status")
    for name, run in report["runs"].items():
        for context, r in run["contexts"].items():
            if r["status"] == "ok":
                peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
                print(f"{name:<12} {int(context):>9} {r['prefill_seconds']:>10.1f} {r['prefill_tokens_per_second']:>9.0f} "
                      f"{r['decode_ms_per_token']:>10.2f} {r.get('decode_ratio_to_bound', 0):>8.2f} {peak:>9}  ok")
            else:
                print(f"{name:<12} {int(context):>9} {'-':>10} {'-':>9} {'-':>10} {'-':>8} {'-':>9}  {r['status']}")


if __name__ == "__main__":
    main()
