#!/usr/bin/env bash
# On the device: GPU tests (kernels, CUDA-graph decode), then the hybrid end to end at 32K-1M with a decode
# profile, and nf4 at 32K.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/bitsandbytes*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
python -m pytest -q -m gpu tests/test_kernels_triton.py tests/test_sala_model.py -p no:cacheprovider 2>&1 | tail -5 | tee $OUT/gpu_tests.log
timeout 480 python bench/e2e.py --models sala --contexts 32768 131072 262144 524288 1048576 --chunk 16384 --time-cap 150 --profile --quant nf4 --out $OUT/e2e_sala.json 2>&1 | tee $OUT/e2e.log
