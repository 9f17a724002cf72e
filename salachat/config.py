"""The user's defaults: a TOML file in the platform's config folder (`salachat config path` prints where).

    model = "smollm2"             # a known name, a .gguf file, a Hugging Face folder …
    device = "auto"               # auto, cpu, cuda, cuda:1
    quant = "nf4"                 # int8 or nf4; leave out for none
    long_context = "auto"         # auto (on when the documents do not fit), on, off
    data_dir = "~/salachat-data"  # models, sessions and caches
    system_prompt = "…"           # replaces salachat's own

    [sampling]
    temperature = 0.0             # 0 = greedy
    top_p = 0.95
    min_p = 0.05
    repeat_penalty = 1.1
    max_tokens = 512
    seed = 7

Flags win over the file, the file over salachat's defaults (sampling: engine.generate.Sampling's). The file
is optional; a broken one is refused with its path and the key at fault (exit 2). SALACHAT_CONFIG names
another file. No torch here: the file is read before any command runs.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from salachat.errors import UsageError

LONG_CONTEXT_MODES = ("auto", "on", "off")
QUANTS = ("int8", "nf4")


class ConfigError(UsageError):
    """The config file cannot be used: its path, the key and what is wrong."""


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    max_tokens: int | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Config:
    model: str | None = None
    device: str | None = None
    quant: str | None = None
    long_context: str | None = None
    data_dir: str | None = None
    system_prompt: str | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    path: Path | None = None  # the file it came from (None: no file)

    def to_dict(self) -> dict:
        top = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("sampling", "path")}
        return {**{k: v for k, v in top.items() if v is not None},
                "sampling": {f.name: getattr(self.sampling, f.name) for f in fields(self.sampling)
                             if getattr(self.sampling, f.name) is not None}}


def config_path() -> Path:
    if os.environ.get("SALACHAT_CONFIG"):
        return Path(os.environ["SALACHAT_CONFIG"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("salachat", appauthor=False)) / "config.toml"


def _check(path: Path, key: str, value, kind: str):
    def bad(expected: str):
        return ConfigError(f"config file {path}: {key} = {value!r}: expected {expected}")

    if kind == "str":
        if not isinstance(value, str) or not value.strip():
            raise bad("a non-empty string")
        return value
    if kind == "device":
        if not isinstance(value, str) or not (value in ("auto", "cpu", "cuda") or value.startswith("cuda:")):
            raise bad("auto, cpu, cuda or cuda:N")
        return value
    if kind == "quant":
        if value not in QUANTS:
            raise bad(" or ".join(QUANTS))
        return value
    if kind == "long_context":
        if value not in LONG_CONTEXT_MODES:
            raise bad(", ".join(LONG_CONTEXT_MODES))
        return value
    if kind in ("float>=0", "prob", "float>0"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        value = float(value)
        if kind == "prob" and not 0.0 <= value <= 1.0:
            raise bad("a number from 0 to 1")
        if kind == "float>0" and value <= 0:
            raise bad("a number above 0")
        if kind == "float>=0" and value < 0:
            raise bad("a number of at least 0")
        return value
    if kind in ("int>=1", "int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("a whole number")
        if kind == "int>=1" and value < 1:
            raise bad("a whole number of at least 1")
        return value
    raise AssertionError(kind)


_TOP = {"model": "str", "device": "device", "quant": "quant", "long_context": "long_context", "data_dir": "str",
        "system_prompt": "str"}
_SAMPLING = {"temperature": "float>=0", "top_p": "prob", "min_p": "prob", "repeat_penalty": "float>0",
             "max_tokens": "int>=1", "seed": "int"}


def parse(text: str, path: Path) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: not valid TOML ({e})") from None
    top, sampling = {}, {}
    for key, value in data.items():
        if key == "sampling":
            if not isinstance(value, dict):
                raise ConfigError(f"config file {path}: sampling must be a table ([sampling])")
            for sub, sub_value in value.items():
                if sub not in _SAMPLING:
                    raise ConfigError(f"config file {path}: unknown key sampling.{sub} "
                                      f"(known: {', '.join(_SAMPLING)})")
                sampling[sub] = _check(path, f"sampling.{sub}", sub_value, _SAMPLING[sub])
        elif key in _TOP:
            top[key] = _check(path, key, value, _TOP[key])
        else:
            raise ConfigError(f"config file {path}: unknown key {key} (known: {', '.join([*_TOP, 'sampling'])})")
    return Config(**top, sampling=SamplingConfig(**sampling), path=path)


def load(path: Path | None = None) -> Config:
    """The config file's settings; an empty Config where there is no file."""
    path = path or config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Config()
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder: remove it or point SALACHAT_CONFIG at a file") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    return parse(text, path)


_loaded: Config | None = None


def current() -> Config:
    """The config file, read once per process."""
    global _loaded
    if _loaded is None:
        _loaded = load()
    return _loaded


def reset() -> None:
    """Forget the file read (tests; after SALACHAT_CONFIG changes)."""
    global _loaded
    _loaded = None
