#!/usr/bin/env bash
# On the GPU machine, from the repository root (the distillation GPU measurements):
#   scripts/gpu/gpu_distill.sh train      Llama-3.2-1B learning from Llama-3.1-8B (NF4 teacher, random
#                                     weights of the real shapes), beside the 1B alone: tokens/s
#                                     and peak memory (scripts/bench/bench_gpu.py --distill-teacher)
#   scripts/gpu/gpu_distill.sh specdec    speculative decoding on the 8B/1B shapes (random weights, so
#                                     the draft agrees by chance only): Llama-3.1-8B with a
#                                     Llama-3.2-1B draft, and with its own first 8 layers, beside
#                                     plain decoding (--compare-plain)
#   scripts/gpu/gpu_distill.sh draft GGUF GSM8K_DIR
#                                     a draft made of SmolLM2-135M's own first 10 of 30 layers,
#                                     distilled from the whole model on GSM8K's train split, then
#                                     speculative decoding on GSM8K test prompts with and without
#                                     the draft: acceptance and tokens/s
# The binary comes from scripts/build/build_cuda.sh (.carry/kiln.xz). The GGUF (93 MB, 92 MB as xz) travels
# in parts, one a call while the machine stays warm, copied to /tmp there (a call carries at most
# 64 MiB with the working tree, whose test fixtures take 24 MB: calls that do not run the CUDA tests
# can move tests/fixtures/* but configs/ and tokenizers/llama3-instruct/ aside here first); then
# `cat /tmp/parts/* | xz -dc > /tmp/smol.gguf` (BENCHMARKS.md, seventh session).
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -x /tmp/kiln ] || { xz -dc .carry/kiln.xz > /tmp/kiln && chmod +x /tmp/kiln; }
K=/tmp/kiln
what=${1:-train}; shift || true
case "$what" in
  train)
    mkdir -p /tmp/kd
    python3 scripts/bench/bench_gpu.py --kiln $K --models llama-3.2-1b --refs none --kiln-ckpt 1 \
      --steps 3 --out /tmp/kd --work /tmp/kd-work
    python3 scripts/bench/bench_gpu.py --kiln $K --models llama-3.2-1b --refs none --kiln-ckpt 1 \
      --steps 3 --distill-teacher llama-3.1-8b --out /tmp/kd --work /tmp/kd-work
    cp /tmp/kd/bench_gpu.json "$OUT/distill-train.json"
    ;;
  specdec)
    for m in Llama-3.1-8B Llama-3.2-1B; do
      mkdir -p /tmp/sd/$m
      cp tests/fixtures/configs/$m.json /tmp/sd/$m/config.json
      cp tests/fixtures/tokenizers/llama3-instruct/tokenizer_config.json /tmp/sd/$m/
      zcat tests/fixtures/tokenizers/llama3-instruct/tokenizer.json.gz > /tmp/sd/$m/tokenizer.json
    done
    : > "$OUT/specdec.txt"
    for draft in "--draft /tmp/sd/Llama-3.2-1B" "--draft /tmp/sd/Llama-3.1-8B --draft-layers 8"; do
      for k in 2 4; do
        echo "== $draft --draft-tokens $k" >> "$OUT/specdec.txt"
        $K generate --model /tmp/sd/Llama-3.1-8B --random-weights --prompt "Three tips for sleep" \
          --max-new-tokens 128 --device cuda $draft --draft-tokens $k --compare-plain 2>&1 >/dev/null \
          | tail -2 >> "$OUT/specdec.txt"
      done
    done
    cat "$OUT/specdec.txt"
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
