#!/usr/bin/env bash
# On the GPU machine, from the repository root (issue 20's GPU measurements):
#   scripts/gpu_distill.sh train      Llama-3.2-1B learning from Llama-3.1-8B (NF4 teacher, random
#                                     weights of the real shapes), beside the 1B alone: tokens/s
#                                     and peak memory (scripts/bench_gpu.py --distill-teacher)
#   scripts/gpu_distill.sh draft GGUF GSM8K_DIR
#                                     a draft made of SmolLM2-135M's own first 10 of 30 layers,
#                                     distilled from the whole model on GSM8K's train split, then
#                                     speculative decoding on GSM8K test prompts with and without
#                                     the draft: acceptance and tokens/s
# The binary comes from scripts/build_cuda.sh (.carry/kiln.xz). The GGUF (93 MB) travels in parts
# (.carry/smol/p00..p02: xz parts, one a call; `cat p0* | xz -dc > smol.gguf` on the machine while it
# stays warm).
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -x /tmp/kiln ] || { xz -dc .carry/kiln.xz > /tmp/kiln && chmod +x /tmp/kiln; }
K=/tmp/kiln
what=${1:-train}; shift || true
case "$what" in
  train)
    mkdir -p /tmp/kd
    python3 scripts/bench_gpu.py --kiln $K --models llama-3.2-1b --refs none --kiln-ckpt 1 \
      --steps 3 --out /tmp/kd --work /tmp/kd-work
    python3 scripts/bench_gpu.py --kiln $K --models llama-3.2-1b --refs none --kiln-ckpt 1 \
      --steps 3 --distill-teacher llama-3.1-8b --out /tmp/kd --work /tmp/kd-work
    cp /tmp/kd/bench_gpu.json "$OUT/distill-train.json"
    ;;
  draft)
    gguf=$1 gsm8k=$2 layers=${3:-10} W=/tmp/draft; mkdir -p $W
    python3 - "$gsm8k" $W <<'EOF'
import json, sys
src, w = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(f"{src}/test.jsonl")][:32]
with open(f"{w}/prompts.txt", "w") as f:
    for r in rows:
        f.write(r["question"].replace("\n", " ") + "\n")
EOF
    cat > $W/draft.toml <<EOF
[model]
path = "$gguf"
layers = $layers
quantize = "none"
device = "cuda"
[data]
path = "$gsm8k/train.jsonl"
format = "prompt_completion"
chat_template = "model"
fields = { prompt = "question", completion = "answer" }
max_seq_len = 512
train_on_inputs = true
[lora]
r = 64
lora_alpha = 64
target_modules = "all-linear"
[training]
micro_batch_size = 16
learning_rate = 1e-3
lr_scheduler = "cosine"
warmup_steps = 20
max_steps = 400
[distill]
teacher = "$gguf"
teacher_quantize = "none"
alpha = 1.0
temperature = 1.0
[output]
dir = "$W/run"
EOF
    $K train $W/draft.toml -q 2>&1 | tail -3
    tail -1 $W/run/metrics.jsonl > "$OUT/draft-last-step.json"
    : > "$OUT/draft-decoding.txt"
    while IFS= read -r p; do
      for draft in "" "--draft $gguf --draft-layers $layers" "--draft $gguf --draft-layers $layers --draft-adapter $W/run/adapter"; do
        echo "== ${draft:-plain}" >> "$OUT/draft-decoding.txt"
        $K generate --model "$gguf" --chat --prompt "$p" --max-new-tokens 128 --device cuda $draft \
          2>&1 >/dev/null | tail -2 >> "$OUT/draft-decoding.txt"
      done
    done < <(head -8 $W/prompts.txt)
    tail -30 "$OUT/draft-decoding.txt"
    ;;
esac
