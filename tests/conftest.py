import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network in tests, ever
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests compare outputs bit for bit across calls; torch's thread count, which salachat otherwise follows the
# machine's load with, changes the order of reductions (the extension against dense differed in the 6th digit).
os.environ.setdefault("SALACHAT_THREADS", "1")
try:  # without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before they are defined
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


def _interpret_dot_elementwise() -> None:
    """The interpreter's tl.dot is numpy's matmul, and numpy 2.4's gives an output element different bits by
    where it sits in the product (a column roll of a 64x16 @ 16x64 product moved 8,100 of 819,200 elements
    over 200 trials). A GPU's MMA computes every element alike, and the block scorers rely on it: the chunk
    two neighbouring blocks share must score the same in both, or the tie the reference breaks toward the
    lower block is broken by a rounding. Here a dot is a sum over k of outer products, in order: the same
    operations for every element wherever it sits."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype not in (np.float32, np.float64) or a.data.ndim != 2:
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        x, y = a.data.astype(d.data.dtype), b.data.astype(d.data.dtype)
        acc = np.zeros((x.shape[0], y.shape[1]), d.data.dtype)
        for i in range(x.shape[1]):
            acc += x[:, i, None] * y[None, i, :]
        return interpreter.TensorHandle(acc + d.data, d.dtype.scalar)

    builder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        _interpret_dot_elementwise()
    except (ImportError, AttributeError):
        pass  # another Triton: its interpreter keeps its own dot


def _missing(what: str, how: str):
    # In CI the set-up installs everything: a missing piece is a failure there, a skip on a laptop.
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing in CI: {how}")
    pytest.skip(f"{what} is not installed: {how}")


def _installed_default_model() -> str | None:
    """The default model where `salachat models pull` put it, found before any test moves the data folder."""
    if os.environ.get("SALACHAT_TEST_MODEL") is not None:
        return os.environ["SALACHAT_TEST_MODEL"] or None
    try:
        from salachat import models

        found = models.locate(models.DEFAULT_MODEL)
    except Exception:  # noqa: BLE001 - a broken data folder means: not installed
        return None
    return str(found) if found else None


INSTALLED_MODEL = _installed_default_model()


@pytest.fixture(autouse=True)
def private_data_folder(tmp_path, monkeypatch):
    """Every test gets its own empty data folder and no config file: none reads or writes the user's."""
    from salachat import config
    from salachat.paths import set_data_dir

    monkeypatch.setenv("SALACHAT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SALACHAT_CONFIG", str(tmp_path / "config.toml"))
    set_data_dir(None)
    config.reset()
    yield tmp_path / "home"
    set_data_dir(None)
    config.reset()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    if not INSTALLED_MODEL:
        _missing("the default model", "run `salachat models pull smollm2`")
    return Path(INSTALLED_MODEL)


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """The default model on the CPU in fp32, loaded once per test session."""
    import torch
    from salachat.engine.loader import load_model

    return load_model(str(smollm2_path), device="cpu", dtype=torch.float32)


@pytest.fixture
def salachat_cli(tmp_path):
    """Run the real `salachat` entry point in a subprocess with its own empty data folder."""
    import subprocess

    home = tmp_path / "home"

    def run(*args, env=None, timeout=300):
        full_env = {**os.environ, "SALACHAT_HOME": str(home), "COLUMNS": "120", **(env or {})}
        return subprocess.run(
            [sys.executable, "-m", "salachat", *map(str, args)],
            capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT, check=False,
        )

    run.home = home
    return run


@pytest.fixture
def salachat_main(capsys, monkeypatch):
    """salachat's entry point (salachat.cli.main) in this process, as a fresh process would run it:
    call(*args, stdin=bytes) gives (exit code, stdout, stderr)."""
    import io

    from salachat import cli, config
    from salachat.paths import set_data_dir

    def call(*args, stdin: bytes | None = None):
        set_data_dir(None)
        config.reset()
        monkeypatch.setattr(sys, "argv", ["salachat", *map(str, args)])
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        with pytest.raises(SystemExit) as exited:
            cli.main()
        captured = capsys.readouterr()
        return exited.value.code, captured.out, captured.err

    return call
