"""Retrieval from long real documents through the product's conversation path (salachat.chat.ChatSession,
what `salachat ask` runs): passkeys hidden in real prose, several labelled keys with one asked for, and
questions whose answers sit on one known page of a real PDF. Each row beside the dense model wherever the
document fits its trained length (past it the product refuses dense reading).

The prose is Vim's reference manual (the Debian package vim-runtime: /usr/share/vim/vim*/doc/*.txt,
`apt-get install vim-runtime`; 9.8 MB, about 2.5M tokens, so even 1M tokens are never repeated text) or,
with `--haystack stdlib`, the docstrings of Python's standard library (about 300K tokens, in every Python).
The PDF is the GNU Libtasn1 manual (Debian libtasn1-doc: /usr/share/doc/libtasn1-doc/libtasn1.pdf).

    python bench/longdoc.py --lengths 4096 16384 65536 --out bench/results/longdoc_cpu.json
    python bench/longdoc.py --device cuda --lengths 4096 65536 262144 1048576 --multikey 65536 262144 --pdf
    python bench/longdoc.py --lengths 16384 --variants '{"focus": {}, "no-focus": {"focus_spans": 0}}'

`--variants` reads each document once and asks its question once per variant (LongContextParams fields
changed on a fork of the reading): "focus_spans": 0 turns the question's focus off (no passage before the
question, the attention-mass selection for its answer); "sampling": "plain" asks that variant with plain
greedy decoding instead of the CLI's defaults (repetition penalty, min-p).

Prints a table; writes JSON rows (task, target length, tokens read, depth, mode, correct, answer, seconds).
"""

from __future__ import annotations

import argparse
import ast
import glob
import importlib.util
import json
import random
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("salachat") is None:  # a checkout not installed (the GPU machine): its root, last,
    sys.path.append(str(ROOT))  # so that its kernels/ and engine/ folders never shadow PyPI packages of those names

VIM_DOCS = "/usr/share/vim/vim*/doc/*.txt"
TASN1_PDF = Path("/usr/share/doc/libtasn1-doc/libtasn1.pdf")
# (question, answer text, the page of the manual that holds it)
PDF_QUESTIONS = [
    ("What is the name of the header file of the Libtasn1 library?", "libtasn1.h", 7),
    ("Which Libtasn1 function searches for an element called name starting from a pointer?", "asn1_find_node", 26),
]
PASSKEY_QUESTION = "What is the pass key? Answer with the number only."
LABELS = ["red", "green", "blue", "yellow"]
SAMPLINGS = {"defaults": {},  # Sampling fields besides max_tokens; the CLI's defaults: repetition penalty, min-p
             "plain": {"repeat_penalty": 1.0, "min_p": 0.0}}
ANSWER_TOKENS = 24


def vim_paragraphs(pattern: str = VIM_DOCS) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"no Vim help files at {pattern}: apt-get install vim-runtime (or --haystack stdlib)")
    paragraphs = []
    for name in files:
        text = Path(name).read_text(encoding="utf-8", errors="replace")
        paragraphs += [p.strip("\n") for p in text.split("\n\n") if p.strip()]
    return paragraphs


def stdlib_paragraphs(limit_chars: int | None = None) -> list[str]:
    """Docstrings of the standard library, module by module in name order (prose by CPython's authors)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paragraphs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "idlelib", "site-packages", "lib2to3"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    paragraphs += [p for p in doc.split("\n\n") if p.strip()]
                    total += len(doc)
        if limit_chars and total >= limit_chars:
            break
    return paragraphs


def haystack(paragraphs: list[str], tokenizer, n_tokens: int, needles: list[tuple[float, str]],
             offset: int = 0) -> str:
    """About n_tokens of consecutive paragraphs (from `offset`), each needle sentence placed between
    paragraphs at its depth (fraction of the text's tokens)."""
    chosen, counts, total = [], [], 0
    i = offset
    while total < n_tokens:
        paragraph = paragraphs[i % len(paragraphs)]
        count = len(tokenizer.encode(paragraph)) + 1
        if i - offset >= len(paragraphs):
            raise ValueError(f"the haystack holds fewer than {n_tokens} tokens")
        chosen.append(paragraph)
        counts.append(count)
        total += count
        i += 1
    inserts: dict[int, list[str]] = {}
    for depth, sentence in needles:
        running, at = 0, len(chosen)
        for j, c in enumerate(counts):
            if running >= depth * total:
                at = j
                break
            running += c
        inserts.setdefault(at, []).append(sentence)
    out = []
    for j, paragraph in enumerate(chosen):
        out += inserts.get(j, [])
        out.append(paragraph)
    out += inserts.get(len(chosen), [])
    return "\n\n".join(out)


def ask_once(loaded, text: str | None, question: str, mode: str, sampling, chunk_size: int | None,
             documents=None, variants: dict | None = None) -> list[dict]:
    """Open a conversation over `text` (what stdin would give `salachat ask`), read it once and ask one
    question: as the product does, or, with `variants` ({name: LongContextParams fields}), once per variant on
    a fork of the same reading (the fields change how the question is answered, not how it was read)."""
    import dataclasses

    from salachat.engine.generate import Stats
    from salachat.engine.long_context import LongContextCache

    from salachat.chat import ChatSession
    from salachat.conversation import ContextTooLong

    t0 = time.perf_counter()
    try:
        session = ChatSession.open(text=text, documents=documents, loaded=loaded, long_context=mode,
                                   chunk_size=chunk_size)
    except ContextTooLong:
        return [{"mode": "dense", "variant": "", "status": "refused: past the trained length"}]
    t1 = time.perf_counter()
    session.read()
    t2 = time.perf_counter()
    read_tokens = session.conversation.document_tokens
    extended = session.context().long_context == "extended"
    rows = []
    for name, overrides in (variants if extended and variants else {"": {}}).items():
        overrides = dict(overrides)
        asked_with = sampling
        if "sampling" in overrides:
            asked_with = type(sampling)(max_tokens=ANSWER_TOKENS, **SAMPLINGS[overrides.pop("sampling")])
        asked = session.fork() if variants else session
        for layer in asked.conversation.cache.layers:
            if isinstance(layer, LongContextCache) and overrides:
                layer.params = dataclasses.replace(layer.params, **overrides)
        stats = Stats()
        answer = "".join(asked.ask(question, asked_with, stats=stats))
        focus = next((layer.focus for layer in asked.conversation.cache.layers
                      if isinstance(layer, LongContextCache)), None)
        rows.append({"mode": session.context().long_context, "variant": name, "status": "ok",
                     "tokens": read_tokens, "answer": answer.strip()[:200], "ingest_seconds": round(t1 - t0, 2),
                     "read_seconds": round(t2 - t1, 2), "read_tokens_per_second": round(read_tokens / (t2 - t1), 1),
                     "answer_seconds": round(stats.prefill_seconds + stats.decode_seconds, 2),
                     "generated_tokens": stats.generated_tokens,
                     "focus_blocks": [] if focus is None else focus.tolist()})
    return rows


def passkey_rows(loaded, paragraphs, lengths, depths, modes, sampling, chunk, variants=None, seed=0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for length in lengths:
        for depth in depths:
            key = str(rng.randint(10000, 99999))
            needle = f"The pass key is {key}. Remember it. {key} is the pass key."
            text = haystack(paragraphs, loaded.tokenizer, length, [(depth / 100, needle)],
                            offset=rng.randrange(len(paragraphs)))
            for mode in modes:
                for found in ask_once(loaded, text, PASSKEY_QUESTION, mode, sampling, chunk, variants=variants):
                    row = {"task": "passkey", "length": length, "depth": depth, "expected": key, **found}
                    row["correct"] = row["status"] == "ok" and key in row["answer"]
                    rows.append(_show(row))
    return rows


def multikey_rows(loaded, paragraphs, lengths, trials, modes, sampling, chunk, variants=None, seed=1) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for length in lengths:
        for trial in range(trials):
            keys = {label: str(rng.randint(10000, 99999)) for label in LABELS}
            depths = rng.sample([10, 30, 50, 70, 90], len(LABELS))
            needles = [(d / 100, f"The pass key of the {label} box is {keys[label]}.")
                       for d, label in zip(depths, LABELS)]
            asked = LABELS[trial % len(LABELS)]
            text = haystack(paragraphs, loaded.tokenizer, length, needles, offset=rng.randrange(len(paragraphs)))
            question = f"What is the pass key of the {asked} box? Answer with the number only."
            for mode in modes:
                for found in ask_once(loaded, text, question, mode, sampling, chunk, variants=variants):
                    row = {"task": "multikey", "length": length, "depth": depths[LABELS.index(asked)],
                           "expected": keys[asked], **found}
                    row["correct"] = row["status"] == "ok" and keys[asked] in row["answer"]
                    rows.append(_show(row))
    return rows


def pdf_rows(loaded, modes, sampling, chunk, variants=None) -> list[dict]:
    from salachat.chat import read_documents

    documents = read_documents([TASN1_PDF])
    rows = []
    for question, answer, page in PDF_QUESTIONS:
        for mode in modes:
            for found in ask_once(loaded, None, question, mode, sampling, chunk, documents=documents,
                                  variants=variants):
                row = {"task": "pdf", "length": None, "depth": f"p.{page}", "expected": answer, **found}
                row["correct"] = row["status"] == "ok" and answer.lower() in row["answer"].lower()
                rows.append(_show(row))
    return rows


_PROGRESS: dict = {"rows": [], "path": None, "head": {}}


def _show(row: dict) -> dict:
    """Print a row as it comes, and keep the JSON file current (a run cut short keeps what it measured)."""
    _PROGRESS["rows"].append(row)
    if _PROGRESS["path"]:
        Path(_PROGRESS["path"]).write_text(json.dumps({**_PROGRESS["head"], "rows": _PROGRESS["rows"]}, indent=1)
                                           + "\n", encoding="utf-8")
    mark = {True: "ok", False: "--"}[bool(row.get("correct"))]
    print(f"  {row['task']:<8} {row['length']!s:>8} {row['depth']!s:>5} {row['mode']:<9} {row['variant']:<10} {mark} "
          f"{row.get('tokens', '')!s:>8} {row.get('read_seconds', '')!s:>7}s  {row.get('answer', row['status'])[:60]!r}",
          flush=True)
    return row


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["length"], r["mode"], r.get("variant", ""), r.get("sampling", "")),
                          []).append(r)
    table = []
    for (task, length, mode, variant, sampling), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        table.append({"task": task, "length": length, "mode": mode, "variant": variant, "sampling": sampling,
                      "runs": len(rs),
                      "correct": sum(r["correct"] for r in rs),
                      "accuracy": round(sum(r["correct"] for r in rs) / len(rs), 3),
                      "read_tokens_per_second": round(sum(r["read_tokens_per_second"] for r in ok) / len(ok), 1)
                      if ok else None,
                      "read_seconds_max": max((r["read_seconds"] for r in ok), default=None),
                      "status": "ok" if ok else rs[0]["status"]})
    return table


def print_table(table: list[dict]) -> None:
    print(f"\n{'task':<9}{'length':>9} {'mode':<9} {'variant':<10} {'sampling':<9} {'correct':>8} {'acc':>6} {'read tok/s':>11} "
          f"{'max read s':>11}  status")
    for t in table:
        acc = f"{t['correct']}/{t['runs']}"
        print(f"{t['task']:<9}{t['length']!s:>9} {t['mode']:<9} {t['variant']:<10} {t['sampling']:<9} {acc:>8} {t['accuracy']:>6} "
              f"{t['read_tokens_per_second']!s:>11} {t['read_seconds_max']!s:>11}  {t['status']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name or path (default: the default model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", type=int, nargs="*", default=[4096, 16384, 65536])
    parser.add_argument("--depths", type=int, nargs="*", default=[10, 30, 50, 70, 90])
    parser.add_argument("--multikey", type=int, nargs="*", default=[], help="lengths for the multi-key task")
    parser.add_argument("--multikey-trials", type=int, default=4)
    parser.add_argument("--pdf", action="store_true", help="the questions on pages of the Libtasn1 manual")
    parser.add_argument("--haystack", choices=["vim", "stdlib"], default="vim")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense rows")
    parser.add_argument("--sampling", nargs="*", default=["defaults"], choices=["defaults", "plain"],
                        help="defaults: Sampling() as the CLI uses it; plain: greedy with no repeat penalty/min-p")
    parser.add_argument("--chunk", type=int, default=None, help="reading chunk (default: the product's)")
    parser.add_argument("--params", default=None, help="JSON of LongContextParams fields to override")
    parser.add_argument("--variants", default=None,
                        help='JSON {name: LongContextParams fields}: ask each question once per variant on the same '
                             'reading, e.g. \'{"focus": {}, "no-focus": {"focus_spans": 0}}\'')
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import dataclasses

    import torch
    from salachat.engine import long_context
    from salachat.engine.generate import Sampling

    from salachat.chat import open_model

    t0 = time.perf_counter()
    loaded = open_model(args.model, device=args.device)
    load_seconds = time.perf_counter() - t0
    if args.params:
        overrides = json.loads(args.params)
        base = long_context.params_for

        def params_for(model):
            return dataclasses.replace(base(model), **overrides)

        long_context.params_for = params_for
    paragraphs = vim_paragraphs() if args.haystack == "vim" else stdlib_paragraphs()
    modes = ["on"] if args.no_dense else ["on", "off"]
    variants = json.loads(args.variants) if args.variants else None
    params = long_context.params_for(loaded.model)
    print(f"longdoc: {loaded.model_id} on {args.device} ({torch.get_num_threads()} threads), "
          f"haystack {args.haystack}, {params}")
    _PROGRESS["path"] = args.out
    _PROGRESS["head"] = {"model": loaded.model_id, "device": args.device, "haystack": args.haystack,
                         "params": dataclasses.asdict(params), "partial": True}
    rows = []
    for name in args.sampling:
        sampling = Sampling(max_tokens=ANSWER_TOKENS, **SAMPLINGS[name])
        _PROGRESS["head"]["sampling"] = name
        found = passkey_rows(loaded, paragraphs, args.lengths, args.depths, modes, sampling, args.chunk, variants)
        found += multikey_rows(loaded, paragraphs, args.multikey, args.multikey_trials, modes, sampling, args.chunk,
                               variants)
        if args.pdf:
            found += pdf_rows(loaded, modes, sampling, args.chunk, variants)
        for r in found:
            r["sampling"] = name
        rows += found
    table = summarise(rows)
    print_table(table)
    result = {"model": loaded.model_id, "device": args.device, "threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "haystack": args.haystack, "params": dataclasses.asdict(params), "load_seconds": round(load_seconds, 2),
              "summary": table, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
