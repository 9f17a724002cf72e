#!/usr/bin/env bash
# The whole GPU benchmark and the GPU tests, on one CUDA machine, from the repository root:
#   bash scripts/device/gpu.sh [section ...]     (default: every section, in order)
# All sections take about 15 minutes (kernel compilation included); where one command may run 10 minutes at
# most, run `tests kernels` and `e2e e2e_1m capped` as two commands.
# Everything lands under $RESULTS (default $OUT, else bench/results/gpu): one log per section and the
# benchmarks' JSON and profiles; after each section results.tgz in $OUT (or $RESULTS) bundles them, so a
# device tool that returns few files from $OUT gets all of them in one. bitsandbytes (for --quant nf4) is
# installed from .whl/ when it is not importable. Sections: tests kernels e2e e2e_1m capped sessions, then the ones
# that other parts of the product add below (their benchmarks, each writing under $RESULTS too).
set -o pipefail
RESULTS=${RESULTS:-${OUT:-bench/results/gpu}}
BUNDLE_TO=${OUT:-$RESULTS}
mkdir -p "$RESULTS" "$BUNDLE_TO"
BUNDLE_TO=$(cd "$BUNDLE_TO" && pwd)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# A GPU machine with torch and triton but no registry: what else salachat imports travels as wheels in .whl/
# (bitsandbytes for --quant nf4, pypdf, gguf, platformdirs, xxhash for session checksums), fetched beforehand with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl NAME
# and for bitsandbytes (its pure-Python 0.42 wheel, 100 MB, is what pip finds otherwise; 0.50.2 is 43 MB):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 -d .whl 'bitsandbytes>=0.45'
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import bitsandbytes, pypdf, gguf, platformdirs, xxhash" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RESULTS/device.txt"

bundle() { (cd "$RESULTS" && tar czf "$BUNDLE_TO/results.tgz.part" --exclude 'results.tgz*' ./* \
    && mv "$BUNDLE_TO/results.tgz.part" "$BUNDLE_TO/results.tgz") 2>/dev/null; }

section_tests() {  # every kernel against its reference on the GPU (bf16, the 9B shapes, groups 1-16)
    timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests/ 2>&1 \
        | tail -40 | tee "$RESULTS/gpu_tests.log"
}

section_kernels() {  # selection (flash and tile scorers), sparse attention and Lightning against dense SDPA
    timeout 240 python3 bench/kernels_bench.py --select-sweep 1048576 --lightning-lengths "${LIGHTNING:-0}" \
        --topk-contexts 131072 1048576 --topk-sweep --sparse-contexts 1048576 --out "$RESULTS/kernels.json" 2>&1 | tail -60 | tee "$RESULTS/kernels.log"
}

section_e2e() {  # 256K: the hybrid at three chunk sizes against the dense Transformer read in one shot
    timeout 200 python3 bench/e2e.py --models sala dense --contexts 262144 --chunks 16384 32768 65536 \
        --time-cap 150 --out "$RESULTS/e2e_256k_vs_dense.json" 2>&1 | tail -12 | tee "$RESULTS/e2e_256k_vs_dense.log"
}

section_e2e_1m() {  # 1M tokens read and 64 decoded, with profiles of a decode step and of a prefill chunk
    # shellcheck disable=SC2086  # CHUNK_1M is a list of chunk sizes
    timeout 300 python3 bench/e2e.py --models sala --contexts 1048576 --chunks ${CHUNK_1M:-16384 32768} \
        --time-cap 150 --profile --out "$RESULTS/e2e_sala_1m.json" 2>&1 | tail -8 | tee "$RESULTS/e2e_sala_1m.log"
}

section_capped() {  # a 24 GB workstation GPU: nf4 weights, 2 GB of sparse K/V on the GPU, the rest in host memory
    timeout 300 python3 bench/e2e.py --models sala --quant nf4 --kv-gpu-gb 2 --memory-cap-gb 24 \
        --contexts 1048576 --chunks "${CHUNK_CAPPED:-16384}" --min-chunk 2048 --time-cap 240 --out "$RESULTS/e2e_sala_nf4_24gb_1m.json" \
        2>&1 | tail -8 | tee "$RESULTS/e2e_sala_nf4_24gb_1m.log"
}

section_sessions() {  # resuming a saved 1M session: time to the first answer token, lazy and full (8.6 GB on disk)
    local dir=${SESSION_DIR:-/tmp/salachat-sessions-bench}
    mkdir -p "$dir"
    timeout 540 python3 bench/sessions_bench.py --device cuda --config sala9b --tokens "${SESSION_TOKENS:-1048576}" \
        --chunk 32768 --skip-checkpointed --dir "$dir" \
        --out "$RESULTS/sessions_sala9b_cuda_resume.json" 2>&1 | tail -30 | tee "$RESULTS/sessions.log"
}

# ---- sections of other parts of the product (long-context Llama, sessions …) go here, named section_<name>
# and listed in SECTIONS below; each writes under $RESULTS ----

section_longdoc() {  # retrieval with the default model past its trained length (needs it in $SALACHAT_HOME,
    # Vim's manual and the Libtasn1 PDF where bench/longdoc.py looks); LONGDOC overrides the lengths and tasks
    local variants='{"focus": {}, "no-focus": {"focus_spans": 0}}' name=${LONGDOC_OUT:-longdoc_gpu}
    [ -n "${LONGDOC_VARIANTS:-}" ] && variants=$LONGDOC_VARIANTS
    # shellcheck disable=SC2086  # LONGDOC is a list of arguments
    timeout 580 python3 bench/longdoc.py --device cuda ${LONGDOC:---lengths 4096 16384 65536 262144 1048576 \
        --multikey 16384 65536 262144 --pdf} --variants "$variants" --out "$RESULTS/$name.json" 2>&1 \
        | tail -"${LONGDOC_TAIL:-60}" | tee "$RESULTS/$name.log"
}

SECTIONS=${*:-tests kernels e2e e2e_1m capped sessions}
for s in $SECTIONS; do
    echo "== $s $(date -u +%H:%M:%S)"
    "section_$s"
    bundle
done
echo "== done $(date -u +%H:%M:%S)"
