#!/usr/bin/env bash
# On the device: the hybrid and both dense baselines in one run, 32K-512K (1M reported as skipped once a
# baseline is past the time cap).
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 290 python bench/e2e.py --models sala dense --contexts 32768 262144 524288 --chunk 16384 --time-cap 90 --out $OUT/e2e_vs_dense.json 2>&1 | tee $OUT/e2e_vs_dense.log
timeout 250 python bench/e2e.py --models sala-dense --contexts 32768 262144 524288 --chunk 16384 --time-cap 90 --out $OUT/e2e_sala_dense.json 2>&1 | tee $OUT/e2e_sala_dense.log
