#!/usr/bin/env bash
# On the device: graph decode tests, then decode at 256K and 1M with every segment between sparse caches graphed.
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python -m pytest -q -m gpu tests/test_sala_model.py tests/test_kernels_triton.py -p no:cacheprovider 2>&1 | tail -4
timeout 420 python bench/e2e.py --models sala --contexts 32768 262144 1048576 --chunk 16384 --time-cap 150 --out $OUT/e2e_sala_graphs.json 2>&1 | tail -6
