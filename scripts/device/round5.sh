#!/usr/bin/env bash
# On the device: a 1M-token 9B SALA session: read, save, resume (checksums), against re-reading.
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p /tmp/sess
timeout 560 python bench/sessions_bench.py --device cuda --config sala9b --tokens 1048576 --skip-checkpointed --dir /tmp/sess --out $OUT/sessions_sala9b_cuda_1m.json 2>&1 | tee $OUT/sessions_1m.log
