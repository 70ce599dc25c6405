#!/usr/bin/env bash
# On the GPU machine, from the repository root: unpacks the CUDA builds carried in .carry/
# (made here by scripts/build/build_cuda.sh), runs the CUDA tests (tests/cuda.rs) and, if asked, the
# benchmark (scripts/bench/bench_gpu.py with the given arguments).
#   scripts/gpu/gpu_check.sh tests
#   scripts/gpu/gpu_check.sh attention      (kiln's attention alone at the reference shapes)
#   scripts/gpu/gpu_check.sh bench --models llama-3.2-1b --refs none
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for f in kiln cuda-tests attention-bench; do
  [ -x "/tmp/$f" ] || { xz -dc ".carry/$f.xz" > "/tmp/$f" && chmod +x "/tmp/$f"; }
done
what=${1:-tests}; shift || true
case "$what" in
  tests)
    KILN_BIN=/tmp/kiln /tmp/cuda-tests --test-threads 1 --nocapture "$@" 2>&1 | tee "$OUT/cuda-tests.log"
    ;;
  attention)
    /tmp/attention-bench 2>&1 | tee "$OUT/attention-bench.log"
    ;;
  bench)
    python3 scripts/bench/bench_gpu.py --kiln /tmp/kiln --bench .carry/bench "$@"
    ;;
esac
