#!/usr/bin/env bash
# On the device: GPU tests, sparse decode microbench at 1M, then decode at 32K/256K/1M with a profile at 1M.
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python -m pytest -q -m gpu tests/test_sala_model.py tests/test_kernels_triton.py -p no:cacheprovider 2>&1 | tail -4
timeout 60 python bench/kernels_bench.py --lightning-lengths 32768 --sparse-contexts 1048576 --out $OUT/kernels_1m.json 2>&1 | tail -8
timeout 420 python bench/e2e.py --models sala --contexts 32768 262144 1048576 --chunk 16384 --time-cap 150 --profile --out $OUT/e2e_sala.json 2>&1 | tail -8
