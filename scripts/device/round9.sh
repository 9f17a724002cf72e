#!/usr/bin/env bash
# On the device: GPU tests, then decode at 32K and 1M with the LSE partials merged by one kernel (profile at 1M).
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python -m pytest -q -m gpu tests/test_sala_model.py tests/test_kernels_triton.py -p no:cacheprovider 2>&1 | tail -3
timeout 420 python bench/e2e.py --models sala --contexts 32768 1048576 --chunk 16384 --time-cap 150 --profile --out $OUT/e2e_sala_merge_lse.json 2>&1 | tail -4
