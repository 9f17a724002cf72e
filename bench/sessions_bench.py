"""Session save/load speed, checkpoint overhead, and resume time against re-reading, for N tokens.

Default: the default model on the CPU in fp32. With `--device cuda --config sala9b` a random-weight 9B
MiniCPM-SALA (bench/e2e.py's SALA_9B, bf16) is built on the GPU, so the lead can measure a GPU-sized state.
Tokens are random ids (speed does not depend on the text). Measured, in one run:
  read        reading N tokens in --chunk-token chunks (512 on the CPU, 8192 on a GPU: the app's defaults), no checkpoints (the re-read a session saves)
  read+ckpt   the same with the measured checkpoint policy (salachat.sessions.Checkpointer): overhead, N/save
  save        a full save of the state to a fresh session folder (fsync'd), GB/s
  save+512    an incremental save after 512 more tokens (only the KV tail is written)
  load        a full load_conversation (lazy=False) with checksums verified, and without
  resume      load vs read: how much sooner a resumed session can answer
  first token time from `resume` to the first answer token (load + a 32-token question's prefill), for a
              full load (everything verified and on the device first) and a lazy one (salachat/sessions/lazy.py:
              the sparse layers' K/V streams in while the question runs), with the files in the page cache
              ("warm") and evicted from it first ("cold", posix_fadvise DONTNEED), against re-reading the
              documents and asking; the lazy answer's logits must equal the full load's bit for bit

    .venv/bin/python bench/sessions_bench.py --tokens 4096
    .venv/bin/python bench/sessions_bench.py --config sala9b-smoke --tokens 8192 --skip-checkpointed
    python bench/sessions_bench.py --device cuda --config sala9b --tokens 131072,1048576 --skip-checkpointed \
        --out bench/results/sessions_sala9b_cuda_resume.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("salachat") is None:  # a checkout not installed (the GPU machine): its root, last,
    sys.path.append(str(ROOT))  # so that its kernels/ and engine/ folders never shadow PyPI packages of those names
sys.path.insert(0, str(ROOT / "bench"))

from salachat.engine.loader import LoadedModel, load_model

from salachat.conversation import Conversation
from salachat.sessions import Checkpointer, SessionWriter, atomic, load_conversation, load_session


def build_loaded(config: str, device: str, model: str | None) -> LoadedModel:
    if config == "default":
        return load_model(model, device=device, dtype=torch.float32 if device == "cpu" else None)
    from e2e import SALA_9B, shrink
    from salachat.engine.models.sala import SalaArgs, SalaForCausalLM

    cfg = copy.deepcopy(shrink(SALA_9B) if config == "sala9b-smoke" else SALA_9B)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        net = SalaForCausalLM(SalaArgs.from_config(cfg)).to(dtype)
    with torch.no_grad():  # small random weights keep activations finite through 32 layers
        for p in net.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return LoadedModel(net.eval(), None, f"random-{config}", f"random-{config}-seed0", "minicpm_sala",
                       torch.device(device), dtype)


def queued(loaded: LoadedModel, tokens: int, chunk: int | None = None, seed: int = 0) -> Conversation:
    """A conversation with N random token ids queued for reading (no tokenizer needed)."""
    conversation = Conversation(loaded, system_prompt="", chunk_size=chunk)  # None: the app's default for the device
    vocab = loaded.model.model.embed_tokens.num_embeddings
    generator = torch.Generator().manual_seed(seed)
    conversation.pending_ids = torch.randint(10, vocab - 1, (tokens,), generator=generator).tolist()
    conversation.document_tokens = tokens
    conversation._reading_text = ""
    return conversation


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    t = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t


def state_bytes(conversation) -> int:
    tensors, _ = conversation.cache.state()
    return sum(t.numel() * t.element_size() for t in tensors.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="4096", help="N, or N,M,... to measure several sizes in one run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", default="default", choices=["default", "sala9b", "sala9b-smoke"])
    parser.add_argument("--model", default=None, help="with --config default: the model (default smollm2)")
    parser.add_argument("--dir", default=None, help="where to write the session (default: a temp folder)")
    parser.add_argument("--skip-checkpointed", action="store_true", help="do not time a second, checkpointed read")
    parser.add_argument("--out", default=None)
    parser.add_argument("--chunk", type=int, default=None, help="tokens per reading step (default: the app's)")
    args = parser.parse_args()
    device = args.device
    loaded = build_loaded(args.config, device, args.model)
    sizes = [int(n) for n in str(args.tokens).split(",")]
    runs = []
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix="sessions-bench-", dir=args.dir))
        try:
            runs.append(run(loaded, args, device, work, n))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    results = runs[0] if len(runs) == 1 else {"runs": runs}
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"sessions_{args.config}_{device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


def evict(folder: Path) -> bool:
    """Drop the session's files from the page cache (a resume days later); False where the OS cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def first_token(folder: Path, loaded, question: torch.Tensor, lazy: bool, device: str):
    """Seconds from the start of a resume to the first answer token; (seconds, logits, stream seconds)."""
    sync(device)
    t0 = time.perf_counter()
    resumed = load_session(folder, loaded, lazy=lazy)
    loaded_s = time.perf_counter() - t0
    logits = loaded.model(question, resumed.state.cache)[-1]
    int(logits.argmax())  # the token, on the host: what a user sees first
    seconds = time.perf_counter() - t0
    stream_s = None
    if resumed.stream is not None:
        resumed.stream.wait()
        stream_s = resumed.stream.seconds
    del resumed
    return {"seconds": seconds, "load_returned_seconds": loaded_s, "stream_seconds": stream_s}, logits


def run(loaded, args, device: str, work: Path, n: int) -> dict:
    conversation = queued(loaded, n, args.chunk)
    _, read_s = timed(conversation.read, device)
    size = state_bytes(conversation)

    checkpointed = None
    if not args.skip_checkpointed:
        again = queued(loaded, n, args.chunk)
        writer = SessionWriter(work / "ckpt", documents=[])
        checkpointer = Checkpointer(writer.save)
        _, ckpt_read_s = timed(lambda: again.read(on_chunk=checkpointer), device)
        checkpointed = {"seconds": ckpt_read_s, "saves": checkpointer.saves, "save_seconds": checkpointer.save_seconds,
                        "overhead_fraction": checkpointer.save_seconds / max(ckpt_read_s - checkpointer.save_seconds, 1e-9),
                        "tokens_between_saves": checkpointer.intervals}
        del again

    writer = SessionWriter(work / "full", documents=[])
    _, save_s = timed(lambda: writer.save(conversation), device)
    disk = sum(f["bytes"] for f in writer.manifest["files"].values())
    more = queued(loaded, 512, args.chunk, seed=1).pending_ids
    conversation.pending_ids = more
    conversation.read()
    _, incr_s = timed(lambda: writer.save(conversation), device)
    incr_bytes = writer.last_save_bytes
    loaded_back, load_s = timed(lambda: load_conversation(work / "full", loaded, lazy=False), device)
    del loaded_back
    _, load_noverify_s = timed(lambda: load_conversation(work / "full", loaded, verify=False, lazy=False), device)
    probe = torch.tensor([11, 12, 13], device=device)
    resumed, _ = load_conversation(work / "full", loaded, lazy=False)
    exact = torch.equal(loaded.model(probe, resumed.cache), loaded.model(probe, conversation.cache))
    del resumed

    vocab = loaded.model.model.embed_tokens.num_embeddings
    question = torch.randint(10, vocab - 1, (32,), generator=torch.Generator().manual_seed(2)).to(device)
    ttft, logits = {}, {}
    for cache_state in ("warm", "cold"):
        for mode in ("full", "lazy"):
            evicted = evict(work / "full") if cache_state == "cold" else False
            if cache_state == "cold" and not evicted:
                continue
            ttft[f"{mode}_{cache_state}"], logits[f"{mode}_{cache_state}"] = first_token(
                work / "full", loaded, question, mode == "lazy", device)
    lazy_exact = all(torch.equal(logits[f"lazy_{c}"], logits[f"full_{c}"]) for c in ("warm", "cold") if f"lazy_{c}" in logits)
    # re-reading instead: the read measured above, then the same question on the freshly read state
    _, question_s = timed(lambda: int(loaded.model(question, conversation.cache)[-1].argmax()), device)
    ttft["reread"] = {"seconds": read_s + question_s, "question_seconds": question_s}

    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None},
        "model": loaded.model_id, "config": args.config, "device": device, "dtype": str(loaded.dtype),
        "tokens": n, "state_bytes": size, "disk_bytes": disk, "checksum": atomic.SAVED_TREE.prefix.rstrip(":"),
        "read_seconds": read_s, "read_tokens_per_second": n / read_s,
        "checkpointed_read": checkpointed,
        "save_seconds": save_s, "save_GBps": disk / save_s / 1e9,
        "incremental_save_512_seconds": incr_s, "incremental_save_512_bytes": incr_bytes,
        "load_verified_seconds": load_s, "load_verified_GBps": disk / load_s / 1e9,
        "load_unverified_seconds": load_noverify_s, "load_unverified_GBps": disk / load_noverify_s / 1e9,
        "resume_speedup_vs_reread": read_s / load_s,
        "resumed_logits_bit_exact": exact,
        "first_token": ttft,
        "lazy_logits_bit_exact": lazy_exact,
    }
    print_table(results)
    return results


def print_table(r: dict) -> None:
    rows = [
        ("tokens", f"{r['tokens']:,}"),
        ("state on disk", f"{r['disk_bytes'] / 2**20:,.1f} MiB  (checksums {r['checksum']})"),
        ("read (no checkpoints)", f"{r['read_seconds']:.2f} s  ({r['read_tokens_per_second']:,.0f} tok/s)"),
    ]
    if r["checkpointed_read"]:
        c = r["checkpointed_read"]
        gaps = c["tokens_between_saves"][1:] or c["tokens_between_saves"]  # the first save comes after one chunk
        every = f"{min(gaps):,}-{max(gaps):,}" if gaps else "-"
        rows.append(("read + checkpoints", (f"{c['seconds']:.2f} s  ({c['saves']} saves, "
                     f"{100 * c['overhead_fraction']:.1f}% overhead, every {every} tokens)")))
    rows += [
        ("full save", f"{r['save_seconds']:.3f} s  ({r['save_GBps']:.2f} GB/s)"),
        ("save after 512 more", (f"{r['incremental_save_512_seconds']:.3f} s  "
                                 f"({r['incremental_save_512_bytes'] / 2**20:.1f} MiB written)")),
        ("load, checksums", f"{r['load_verified_seconds']:.3f} s  ({r['load_verified_GBps']:.2f} GB/s)"),
        ("load, no checksums", f"{r['load_unverified_seconds']:.3f} s  ({r['load_unverified_GBps']:.2f} GB/s)"),
        ("resume vs re-read", f"{r['resume_speedup_vs_reread']:,.0f}x sooner"),
        ("resumed logits bit-exact", str(r["resumed_logits_bit_exact"])),
    ]
    for key, t in r["first_token"].items():
        extra = f"  (load returned after {t['load_returned_seconds']:.3f} s" if "load_returned_seconds" in t else ""
        if t.get("stream_seconds") is not None:
            extra += f", K/V streamed in {t['stream_seconds']:.3f} s"
        rows.append((f"first token, {key.replace('_', ', ')}", f"{t['seconds']:.3f} s{extra}{')' if extra else ''}"))
    rows.append(("lazy logits bit-exact", str(r["lazy_logits_bit_exact"])))
    width = max(len(k) for k, _ in rows)
    print(f"{r['model']} on {r['device']} ({r['dtype']})")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


if __name__ == "__main__":
    main()
