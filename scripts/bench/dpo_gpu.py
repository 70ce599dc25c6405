"""kiln's DPO on the shared job's shapes, alone (no peer yet): a random-weight model of a real
config (as scripts/bench/bench_gpu.py makes it), synthetic pairs of about PAIR_TOKENS tokens
(a random-word prompt of a quarter, two random-word completions), NF4, LoRA r16 on q/k/v/o,
micro-batch 4 pairs, every layer recomputed. Prints pairs/s and the driver's peak memory.

    python3 scripts/bench/dpo_gpu.py --kiln /tmp/kiln --model llama-3.2-1b [--steps 6]
"""
import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(__file__))
from bench_gpu import model_dir, run_measured  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--kiln", default="/tmp/kiln")
ap.add_argument("--model", default="llama-3.2-1b")
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--pair-tokens", type=int, default=1024)
ap.add_argument("--work", default="/tmp/kiln-dpo-bench")
ap.add_argument("--extra", default="", help="more --set overrides, comma-separated")
args = ap.parse_args()

os.makedirs(args.work, exist_ok=True)
d = model_dir(args.work, args.model)
rng = random.Random(0)
words = ["alpha", "river", "stone", "market", "seven", "blue", "garden", "light", "number", "window"]
def text(n):
    return " ".join(rng.choice(words) for _ in range(n))
# About one token a word with these words (checked by kiln's data statistics below).
n = args.pair_tokens
with open(f"{args.work}/pairs.jsonl", "w") as f:
    for _ in range(64):
        f.write(json.dumps({"prompt": text(n // 4), "chosen": " " + text(3 * n // 4 - 2),
                            "rejected": " " + text(3 * n // 4 - 2)}) + "\n")
recipe = f"""[model]
path = "{d}"
random_weights = true
quantize = "nf4"
device = "cuda"
[data]
path = "{args.work}/pairs.jsonl"
max_seq_len = {n}
[lora]
r = 16
lora_alpha = 32
lora_dropout = 0.05
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
[training]
method = "dpo"
micro_batch_size = 4
max_steps = {args.steps}
learning_rate = 2e-4
gradient_checkpointing = true
[output]
dir = "{args.work}/run"
"""
open(f"{args.work}/dpo.toml", "w").write(recipe)
cmd = [args.kiln, "train", f"{args.work}/dpo.toml"]
for s in filter(None, args.extra.split(",")):
    cmd += ["--set", s]
rc, out, peak_mib = run_measured(cmd)
print(out[-1500:])
assert rc == 0, rc
lines = [json.loads(l) for l in open(f"{args.work}/run/metrics.jsonl") if '"lr"' in l]
timed = lines[1:]
tok_s = sum(l["tokens"] for l in timed) / sum(l["tokens"] / l["tokens_per_s"] for l in timed)
tokens_per_pair = sum(l["tokens"] for l in timed) / (4 * len(timed))
print(json.dumps({"model": args.model, "tokens_per_s": round(tok_s), "pairs_per_s": round(tok_s / tokens_per_pair, 2),
                  "tokens_per_pair": tokens_per_pair, "peak_gib": round(peak_mib / 1024, 2)}))
