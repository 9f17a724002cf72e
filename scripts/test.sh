#!/usr/bin/env bash
# The README's second command (and exactly what .ci/run runs): set up with test extras, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # Real documents that no one here wrote, for the ingest tests (Debian documentation packages).
    bash scripts/test-documents.sh
fi
bash scripts/setup.sh --test
# -P: the repository root stays off sys.path, so its folders (kernels/, engine/) never shadow the PyPI packages
# of those names (transformers imports `kernels`); salachat is imported as installed.
# Kernels run on the CPU through Triton's interpreter in CI; the GPU tests need `pytest -m gpu` on a GPU.
exec .venv/bin/python -P -m pytest -q -p no:cacheprovider "$@"
