#!/usr/bin/env bash
# Here (no GPU needed): builds kiln and its CUDA tests with `--features cuda` as
# ../shared/cuda/README.md describes, and packs them into .carry/ (git-ignored) for the GPU
# machine, where scripts/gpu/gpu_check.sh unpacks and runs them.
set -euo pipefail
cd "$(dirname "$0")/../.."
source <(../shared/cuda/setup.sh --env)
export CARGO_TARGET_DIR=target/cuda
cargo clippy --release --features cuda --all-targets -- -D warnings
cargo build --release --features cuda
cargo build --release --features cuda --example attention_bench
test_bin=$(cargo test --release --features cuda --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])')
mkdir -p .carry
strip -o /tmp/kiln-cuda target/cuda/release/kiln && xz -T2 -c /tmp/kiln-cuda > .carry/kiln.xz
strip -o /tmp/kiln-cuda-tests "$test_bin" && xz -T2 -c /tmp/kiln-cuda-tests > .carry/cuda-tests.xz
strip -o /tmp/kiln-attention-bench target/cuda/release/examples/attention_bench && xz -T2 -c /tmp/kiln-attention-bench > .carry/attention-bench.xz
ls -la .carry
