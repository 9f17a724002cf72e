"""Every option of the command line, declared once as an Annotated type and used by every command it fits.

No `from __future__ import annotations` here or in the command modules: Typer reads these annotations as
objects. Flags left out are None, and resolve to the config file's value, then to salachat's default
(`settings`), so `salachat config show` and `--help` never disagree with what a command does.
"""

import functools
import inspect
import os
from pathlib import Path
from typing import Annotated

import typer

from salachat import config, errors

MODEL_HELP = "A known model name, a GGUF file, a Hugging Face folder, org/name from the HF cache, ollama:NAME."

Paths = Annotated[list[Path], typer.Argument(help="Documents: PDF, EPUB, text, HTML, Markdown, a folder, or - for "
                                                   "standard input.", show_default=False)]
Model = Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP, show_default=False)]
Quant = Annotated[str | None, typer.Option("--quant", help="Quantise weights on load: int8 or nf4.")]
Device = Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda[:N]. [default: auto]")]
Dtype = Annotated[str | None, typer.Option(
    "--dtype", help="Weights and state: float32, bfloat16 or float16. [default: bfloat16 on a GPU, float32 on a CPU]")]
Sparse = Annotated[bool, typer.Option(
    "--sparse", help="Read with the long-context extension even where the documents fit (dense Llama models; "
                     "past the trained length it turns on by itself).")]
LongContext = Annotated[str | None, typer.Option(
    "--long-context", help="auto (the extension turns on when the documents do not fit), on, off. [default: auto]")]
Session = Annotated[str | None, typer.Option("--session", "-s", help="Save as (or continue) this session.")]
Password = Annotated[str | None, typer.Option("--password", help="Password of an encrypted PDF.")]
System = Annotated[str | None, typer.Option("--system", help="The system prompt, instead of salachat's.")]
MaxTokens = Annotated[int | None, typer.Option("--max-tokens", min=1, help="Longest answer, in tokens. "
                                                                               "[default: 512]")]
Temperature = Annotated[float | None, typer.Option("--temperature", min=0.0, help="0 = greedy. [default: 0]")]
TopP = Annotated[float | None, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling. [default: 1]")]
MinP = Annotated[float | None, typer.Option(
    "--min-p", min=0.0, max=1.0, help="Keep tokens at least this likely relative to the best one.")]
RepeatPenalty = Annotated[float | None, typer.Option(
    "--repeat-penalty", min=0.0, help="Divide the logits of recently seen tokens by this (1 = off).")]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed for sampling (temperature > 0).")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object (docs/architecture.md: the --json "
                                                   "schema), errors included.")]
Engine = Annotated[str | None, typer.Option(
    "--engine", help="Send the conversation to this OpenAI-compatible server (http://host:port) instead of "
                     "running the model here.", show_default=False)]

DataDir = Annotated[Path | None, typer.Option(
    "--data-dir", help="Where salachat keeps models, sessions and caches. [env: SALACHAT_HOME]",
    show_default=False)]
KvGpuGb = Annotated[float | None, typer.Option(
    "--kv-gpu-gb", min=0.0, help="GPU memory for the sparse layers' KV cache; older blocks wait in host memory "
                                 "and are fetched when selected. [env: SALACHAT_KV_GPU_GB]", show_default=False)]
GLOBAL_OPTIONS = ("--data-dir", "--kv-gpu-gb")


def apply_globals(data_dir: Path | None, kv_gpu_gb: float | None) -> None:
    from salachat.paths import set_data_dir

    if data_dir is not None:
        set_data_dir(data_dir)
    if kv_gpu_gb is not None:  # read by engine.loader.load_model, whichever command loads the model
        os.environ["SALACHAT_KV_GPU_GB"] = str(kv_gpu_gb)


def with_global_options(fn):
    """The command, taking --data-dir and --kv-gpu-gb too (after the command name, as users type them)."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def command(*args, data_dir: DataDir = None, kv_gpu_gb: KvGpuGb = None, **kwargs):
        apply_globals(data_dir, kv_gpu_gb)
        return fn(*args, **kwargs)

    extra = [inspect.Parameter("data_dir", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=DataDir),
             inspect.Parameter("kv_gpu_gb", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=KvGpuGb)]
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
              else p for p in signature.parameters.values()]
    command.__signature__ = signature.replace(parameters=params + extra)
    command.__annotations__ = {**fn.__annotations__, "data_dir": DataDir, "kv_gpu_gb": KvGpuGb}
    return command


def check_choice(flag: str, value: str | None, choices: tuple[str, ...]) -> str | None:
    if value is not None and value not in choices:
        raise errors.UsageError(f"{flag} {value}: choose {' or '.join(choices)}")
    return value


def settings(*, model=None, device=None, quant=None, dtype=None, long_context=None, sparse=False,
             system=None) -> dict:
    """Keyword arguments of ChatSession.open from the flags, else the config file, else the defaults."""
    conf = config.current()
    check_choice("--quant", quant, config.QUANTS)
    check_choice("--long-context", long_context, config.LONG_CONTEXT_MODES)
    check_choice("--dtype", dtype, ("float32", "bfloat16", "float16"))
    mode = "on" if sparse else (long_context or conf.long_context or "auto")
    return {"model": model or conf.model, "device": device or conf.device or "auto",
            "quant": quant or conf.quant, "dtype": _dtype(dtype), "long_context": mode,
            "system_prompt": system or conf.system_prompt}


def _dtype(name: str | None):
    if name is None:
        return None
    import torch

    return getattr(torch, name)


def sampling(*, max_tokens=None, temperature=None, top_p=None, min_p=None, repeat_penalty=None, seed=None):
    """engine.generate.Sampling from the flags, else the config file's [sampling], else its dataclass defaults."""
    from salachat.engine.generate import Sampling

    conf = config.current().sampling
    flags = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "min_p": min_p,
             "repeat_penalty": repeat_penalty, "seed": seed}
    chosen = {}
    for name, flag in flags.items():
        value = flag if flag is not None else getattr(conf, name)
        if value is not None:
            chosen[name] = value
    return Sampling(**chosen)


def check_paths(paths: list[Path]) -> None:
    """A mistyped path is reported at once, before the model (and torch) load."""
    for path in paths:
        if str(path) == "-":
            continue
        if not path.exists() and not path.is_symlink():
            raise errors.UserError(f"{path}: no such file or folder", errors.BAD_INPUT)
    if sum(1 for p in paths if str(p) == "-") > 1:
        raise errors.UsageError("- (standard input) can be given once")
