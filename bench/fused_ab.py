"""A/B in one process on a CUDA GPU: MiniCPM-SALA 9B (random bf16 weights) with the fused pointwise kernels
and the RoPE frequencies kept on the device, against the unfused ops (the kernels' references) and the
frequencies copied from the CPU at every forward (what the model did before); same model, same context,
alternating rounds. Times the last 64K-token chunk of a CTX-token read and 64 decoded tokens (also read back
token by token, as the product decodes). First, silu_mul's tiles against torch's silu and multiply.

    CTX=131072 python bench/fused_ab.py        (writes $OUT/fused_ab.json, else bench/results/)
"""
import json, os, sys, time
import torch
sys.path.insert(0, "bench")
import e2e
from salachat import kernels
from salachat.engine.models import llama
from salachat.kernels.pointwise.triton import silu_mul_triton
import torch.nn.functional as F

FUSED = {k: kernels._TRITON[k] for k in ("silu_mul", "add_rms_norm", "gated_rms_norm", "norm_rope")}
cached_cos_sin = llama.Rotary.cos_sin
def syncing_cos_sin(self, positions):  # as before: the CPU frequencies copied to the GPU at every call
    self._on.clear()
    return cached_cos_sin(self, positions)

def variant(fused, rope_cached):
    for k, f in FUSED.items():
        if fused: kernels._TRITON[k] = f
        else: kernels._TRITON.pop(k, None)
    llama.Rotary.cos_sin = cached_cos_sin if rope_cached else syncing_cos_sin

def timed(fn, reps=10):
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[len(ts) // 2]

out = {}
g = torch.randn(65536, 32768, device="cuda", dtype=torch.bfloat16)
want = F.silu(g[:, :16384]) * g[:, 16384:]
out["silu_torch_ms"] = timed(lambda: F.silu(g[:, :16384]) * g[:, 16384:])
for rows, bn, w in [(1, 1024, 4), (4, 1024, 4), (8, 1024, 8), (2, 2048, 8), (4, 2048, 8), (16, 256, 4), (8, 512, 4), (32, 128, 4)]:
    got = silu_mul_triton(g, rows, bn, w)
    out[f"silu_r{rows}_bn{bn}_w{w}_ms"] = timed(lambda: silu_mul_triton(g, rows, bn, w))
    out[f"silu_r{rows}_bn{bn}_w{w}_equal"] = bool(torch.equal(got, want))
print(json.dumps(out), flush=True)
del g, want; torch.cuda.empty_cache()

model = e2e.build("sala", "cuda")
ctx, chunk = int(os.environ.get("CTX", 131072)), 65536
ids = torch.randint(1000, 70000, (ctx,), device="cuda")
variants = {"before": (False, False), "fused": (True, False), "fused_rope_cached": (True, True)}
for rnd in range(3):
    for name, (fused, cached) in variants.items():
        variant(fused, cached)
        model._graphs = None; del model._graphs
        cache = model.new_cache()
        with torch.inference_mode():
            for b in range(0, ctx - chunk, chunk):
                logits = model(ids[b:b + chunk], cache, last_only=True)
            torch.cuda.synchronize(); t = time.perf_counter()
            logits = model(ids[ctx - chunk:], cache, last_only=True)
            torch.cuda.synchronize(); pre = (time.perf_counter() - t) * 1e3
            tok = logits[-1].argmax().view(1)
            for _ in range(3):
                tok = model(tok, cache)[-1].argmax().view(1)
            torch.cuda.synchronize(); t = time.perf_counter()
            for _ in range(64):
                tok = model(tok, cache)[-1].argmax().view(1)
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t) / 64 * 1e3
        if name == "fused_rope_cached":  # as the product decodes: the token read back every step
            with torch.inference_mode():
                t = time.perf_counter()
                for _ in range(64):
                    tok = torch.tensor([int(model(tok, cache)[-1].argmax())], device="cuda")
            out.setdefault(name + "_decode_synced_ms", []).append((time.perf_counter() - t) / 64 * 1e3)
        out.setdefault(name + "_decode_ms", []).append(ms)
        out.setdefault(name + f"_prefill_chunk_ms", []).append(pre)
        print(rnd, name, f"chunk {pre:.1f} ms, decode {ms:.3f} ms/token", flush=True)
        del cache; torch.cuda.empty_cache()
print(json.dumps(out))
json.dump(out, open(os.path.join(os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "results")),
                                 "fused_ab.json"), "w"), indent=1)
