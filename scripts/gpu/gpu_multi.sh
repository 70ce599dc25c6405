#!/usr/bin/env bash
# On a machine with two GPUs (nvidia-h200-x2), from the repository root: kiln's data-parallel
# training checked end to end with NCCL. The binary comes from scripts/build/build_cuda.sh
# (.carry/kiln.xz).
#   scripts/gpu/gpu_multi.sh checks     equivalence, torchrun, a killed rank, resume on 2 and on 1 GPU
#   scripts/gpu/gpu_multi.sh scaling    Llama-3.1-8B, the shared bench job, on 1, 2, 4 and 8 GPUs (as
#                                   many as the machine has), the step batch the same at every
#                                   count (accumulation = max(4, GPUs) / N), with the efficiency
#   scripts/gpu/gpu_multi.sh four       (4+ GPUs) the tiny recipe 50 steps: 4 GPUs x
#                                   accumulation 1 against 1 GPU x accumulation 4
# Results go to $OUT (multi-*.log, multi-checks.json).
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
# NVLink multicast stays off on these shared machines (README, "Several GPUs").
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -x /tmp/kiln ] || { xz -dc .carry/kiln.xz > /tmp/kiln && chmod +x /tmp/kiln; }
K=/tmp/kiln
# NCCL: the system's, else the one pip installed beside torch.
if ! ldconfig -p 2>/dev/null | grep -q libnccl.so.2 && [ -z "${KILN_NCCL_LIB:-}" ]; then
  lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null)
  [ -f "$lib" ] && export KILN_NCCL_LIB=$lib
fi
echo "NCCL: ${KILN_NCCL_LIB:-from the system}"
W=/tmp/multi; mkdir -p $W
export KILN_CACHE=$W/cache

# The tiny recipe on the GPUs for 50 steps, a checkpoint every 10; the step batch is 16
# sequences however it is split.
tiny() { # OUTDIR ACCUM [args...]
  local out=$1 accum=$2; shift 2
  $K train recipes/tiny.toml --device cuda --set output.dir=\"$out\" \
    --set training.max_steps=50 --set training.save_steps=10 \
    --set training.gradient_accumulation_steps=$accum "$@"
}

case "${1:-checks}" in
checks)
  nvidia-smi -L | tee $OUT/multi-gpus.txt
  rm -rf $W/one $W/two $W/torchrun $W/kill2 $W/kill1
  # 1. Equivalence: 1 GPU x accumulation 4 against 2 GPUs x accumulation 2.
  tiny $W/one 4 -q 2>&1 | tee $OUT/multi-one.log
  tiny $W/two 2 --gpus 2 2>&1 | tee $OUT/multi-two.log
  # 2. torchrun starts the same binary (no Python in between).
  torchrun --standalone --nproc-per-node 2 --no-python $K train recipes/tiny.toml --device cuda \
    --set output.dir=\"$W/torchrun\" --set training.max_steps=50 --set training.save_steps=10 \
    --set training.gradient_accumulation_steps=2 2>&1 | tee $OUT/multi-torchrun.log
  # 3. Rank 1 killed with SIGKILL as step 25 begins: how long until every rank has stopped.
  start=$(date +%s%N)
  KILN_FAULT=kill-step:25@1 tiny $W/kill2 2 --gpus 2 -q > $OUT/multi-kill.log 2>&1
  rc=$?
  echo "exit $rc after $(( ($(date +%s%N) - start) / 1000000 )) ms" | tee -a $OUT/multi-kill.log
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv | tee -a $OUT/multi-kill.log
  ls $W/kill2 | tee -a $OUT/multi-kill.log
  # 4. Resume: on 2 GPUs, and a copy on 1 GPU with twice the accumulation.
  cp -r $W/kill2 $W/kill1
  tiny $W/kill2 2 --gpus 2 --resume 2>&1 | tee $OUT/multi-resume2.log
  tiny $W/kill1 4 --resume 2>&1 | tee $OUT/multi-resume1.log
  python3 - "$W" "$OUT" <<'EOF'
import json, sys, hashlib
w, out = sys.argv[1], sys.argv[2]
def losses(d):
    return [json.loads(l)["loss"] for l in open(f"{w}/{d}/metrics.jsonl") if '"loss"' in l]
def digest(d):
    return hashlib.sha256(open(f"{w}/{d}/adapter/adapter_model.safetensors", "rb").read()).hexdigest()[:16]
one = losses("one")
res = {"steps": len(one), "first_loss": one[0], "last_loss": one[-1]}
for d in ["two", "torchrun", "kill2", "kill1"]:
    l = losses(d)
    res[d] = {"steps": len(l), "max_rel_loss_diff_vs_one": max(abs(a - b) / abs(a) for a, b in zip(one, l)),
              "adapter": digest(d)}
res["one"] = {"adapter": digest("one")}
hashes = [l.strip() for l in open(f"{out}/multi-two.log") if "the same on all" in l]
res["checkpoint_hash_lines"] = hashes
json.dump(res, open(f"{out}/multi-checks.json", "w"), indent=1)
print(json.dumps(res, indent=1))
EOF
  ;;
four)
  rm -rf $W/one4 $W/four
  tiny $W/one4 4 -q 2>&1 | tee $OUT/multi-one4.log
  tiny $W/four 1 --gpus 4 2>&1 | tee $OUT/multi-four.log
  python3 - "$W" "$OUT" <<'EOF'
import json, sys
w, out = sys.argv[1], sys.argv[2]
def losses(d):
    return [json.loads(l)["loss"] for l in open(f"{w}/{d}/metrics.jsonl") if '"loss"' in l]
a, b = losses("one4"), losses("four")
res = {"steps": len(a), "max_rel_loss_diff": max(abs(x - y) / abs(x) for x, y in zip(a, b)),
       "first_loss": a[0], "last_loss": a[-1]}
json.dump(res, open(f"{out}/multi-four.json", "w"), indent=1)
print(json.dumps(res, indent=1))
EOF
  ;;
scaling)
  shift
  gpus=$(nvidia-smi -L | wc -l)
  total=$(( gpus > 4 ? gpus : 4 ))
  for g in 1 2 4 8; do
    [ $g -le $gpus ] || break
    python3 scripts/bench/bench_gpu.py --kiln $K --bench .carry/bench-lite --models llama-3.1-8b --refs none \
      --kiln-ckpt auto --steps 3 --gpus $g --accum $((total / g)) --out $OUT "$@" 2>&1 | tail -5
    cp $OUT/bench_gpu.json $OUT/multi-scaling-$g.json 2>/dev/null
  done
  python3 - "$OUT" <<'EOF'
import glob, json, sys
out = sys.argv[1]
runs = {}
for f in glob.glob(f"{out}/multi-scaling-*.json"):
    r = json.load(open(f))[-1]
    runs[r.get("gpus", 1)] = r
one = runs.get(1, {}).get("tokens_per_s")
print("| GPUs | accumulation | tokens/s | efficiency | peak per GPU |")
print("|---|---|---|---|---|")
for g in sorted(runs):
    r = runs[g]
    eff = f"{r['tokens_per_s'] / (g * one):.1%}" if one and r.get("tokens_per_s") else ""
    print(f"| {g} | {r.get('grad_accum')} | {r.get('tokens_per_s')} | {eff} | {r.get('peak_mem_gib')} GiB |")
EOF
  # The all-reduce's time per step (KILN_PROFILE=1: the device synchronized around it).
  mkdir -p $OUT/profile
  KILN_PROFILE=1 python3 scripts/bench/bench_gpu.py --kiln $K --bench .carry/bench-lite --models llama-3.1-8b \
    --refs none --kiln-ckpt auto --steps 2 --gpus 2 --accum 2 --out $OUT/profile "$@" > /dev/null 2>&1
  grep -h "all-reduce" $OUT/profile/kiln-*.log | tail -4 | tee $OUT/multi-allreduce.txt
  ;;
esac
