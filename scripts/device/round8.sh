#!/usr/bin/env bash
# On the device: SALA against the dense Transformer at 256K in one run (plus nf4 decode at 32K), then 1M again.
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/bitsandbytes*.whl && export PYTHONPATH=/tmp/site:$PWD
timeout 300 python bench/e2e.py --models sala dense --contexts 262144 --chunk 16384 --time-cap 150 --quant nf4 --out $OUT/e2e_256k_vs_dense.json 2>&1 | tail -6
timeout 240 python bench/e2e.py --models sala --contexts 1048576 --chunk 16384 --time-cap 150 --out $OUT/e2e_sala_1m_again.json 2>&1 | tail -3
