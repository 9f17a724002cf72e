#!/usr/bin/env bash
# On the device: GPU tests, then the hybrid end to end at 32K-1M with a decode profile and nf4.
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python -m pytest -q -m gpu tests/test_kernels_triton.py -p no:cacheprovider 2>&1 | tail -5 | tee $OUT/gpu_tests.log
timeout 500 python bench/e2e.py --models sala --contexts 32768 131072 262144 524288 1048576 --chunk 16384 --time-cap 150 --profile --quant nf4 --out $OUT/e2e_sala.json 2>&1 | tee $OUT/e2e.log
