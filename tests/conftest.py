import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network in tests, ever
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
try:  # without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before they are defined
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


def _missing(what: str, how: str):
    # In CI the set-up installs everything: a missing piece is a failure there, a skip on a laptop.
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing in CI: {how}")
    pytest.skip(f"{what} is not installed: {how}")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from salachat.engine import registry

    path = os.environ.get("SALACHAT_TEST_MODEL") or registry.locate("smollm2")
    if not path:
        _missing("the default model", "run `salachat models pull smollm2`")
    return Path(path)


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
            capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT,
        )

    run.home = home
    return run
