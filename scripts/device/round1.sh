#!/usr/bin/env bash
# On the device (through the `run` tool): GPU kernel tests, kernel microbenchmarks, end-to-end SALA figures.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/einops*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
true || python -m pytest -q -m gpu tests/test_kernels_triton.py tests/test_cache.py -p no:cacheprovider 2>&1 | tail -25 | tee $OUT/gpu_tests.log
timeout 240 python bench/kernels_bench.py --sweep --reference --out $OUT/kernels.json 2>&1 | tee $OUT/kernels.log
timeout 200 python bench/e2e.py --models sala --contexts 32768 131072 262144 --chunk 16384 --time-cap 120 --out $OUT/e2e_sala.json 2>&1 | tee $OUT/e2e.log
