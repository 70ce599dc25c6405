"""kiln's DPO on the shared job's shapes, beside Unsloth + TRL's DPOTrainer in the same run: a
random-weight model of a real config (as scripts/bench/bench_gpu.py makes it), synthetic pairs of
about PAIR_TOKENS tokens (a random-word prompt of a quarter, two random-word completions), NF4, LoRA
r16 on q/k/v/o with dropout 0 (TRL's DPO turns dropout off), micro-batch 4 pairs, DPO sigmoid beta
0.1, the adapter-off reference. Prints pairs/s and the driver's peak memory of each run, then a table.

    python3 scripts/bench/dpo_gpu.py --kiln /tmp/kiln --model llama-3.2-1b [--steps 8] \
        [--kiln-ckpt 1,auto] [--precompute 0,1] [--refs unsloth --bench .carry/bench]
"""
import argparse
import json
import os
import random
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from bench_gpu import ckpt_value, model_dir, run_measured  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--kiln", default="/tmp/kiln")
ap.add_argument("--model", default="llama-3.2-1b")
ap.add_argument("--steps", type=int, default=8)
ap.add_argument("--pair-tokens", type=int, default=1024)
ap.add_argument("--kiln-ckpt", default="1", help="kiln's gradient_checkpointing: 1, 0, auto, offload, or several")
ap.add_argument("--precompute", default="0", help="precompute_ref_log_probs: 0, 1, or both (0,1)")
ap.add_argument("--refs", default="none", help="unsloth: Unsloth + TRL DPOTrainer on the same pairs")
ap.add_argument("--ref-ckpt", default="unsloth", help="Unsloth's use_gradient_checkpointing: unsloth, 1, 0, or several")
ap.add_argument("--fused-loss", default="0", help="Unsloth's UNSLOTH_FUSED_PREFERENCE_LOSS: 0, 1 or both")
ap.add_argument("--bench", default=".carry/bench", help="a copy of shared/bench (wheels, unsloth_bench.py)")
ap.add_argument("--work", default="/tmp/kiln-dpo-bench")
ap.add_argument("--out", default=os.environ.get("OUT", "."))
ap.add_argument("--extra", default="", help="more --set overrides for kiln, comma-separated")
args = ap.parse_args()

os.makedirs(args.work, exist_ok=True)
d = model_dir(args.work, args.model)
rng = random.Random(0)
words = ["alpha", "river", "stone", "market", "seven", "blue", "garden", "light", "number", "window"]
def text(n):
    return " ".join(rng.choice(words) for _ in range(n))
# About one token a word with these words (checked by kiln's data statistics below).
n = args.pair_tokens
pairs = f"{args.work}/pairs.jsonl"
with open(pairs, "w") as f:
    for _ in range(64):
        f.write(json.dumps({"prompt": text(n // 4), "chosen": " " + text(3 * n // 4 - 2),
                            "rejected": " " + text(3 * n // 4 - 2)}) + "\n")
results = []


def record(r):
    results.append(r)
    print(json.dumps(r), flush=True)
    with open(os.path.join(args.out, f"dpo_gpu-{args.model}.json"), "w") as f:
        json.dump(results, f, indent=1)


def kiln_run(ckpt, precompute):
    tag = f"{ckpt}-{precompute}"
    recipe = f"""[model]
path = "{d}"
random_weights = true
quantize = "nf4"
device = "cuda"
[data]
path = "{pairs}"
max_seq_len = {n}
[lora]
r = 16
lora_alpha = 32
lora_dropout = 0.0
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
[training]
method = "dpo"
micro_batch_size = 4
max_steps = {args.steps}
learning_rate = 2e-4
gradient_checkpointing = {ckpt_value(ckpt)}
[preference]
precompute_ref_log_probs = {"true" if precompute else "false"}
[output]
dir = "{args.work}/run-{tag}"
"""
    open(f"{args.work}/dpo-{tag}.toml", "w").write(recipe)
    cmd = [args.kiln, "train", f"{args.work}/dpo-{tag}.toml", "--quiet"]
    for s in filter(None, args.extra.split(",")):
        cmd += ["--set", s]
    rc, out, peak_mib = run_measured(cmd)
    res = dict(system="kiln", model=args.model, ckpt=str(ckpt), precompute=bool(precompute), peak_gib=round(peak_mib / 1024, 2))
    if rc != 0:
        res["error"] = " | ".join(out.strip().splitlines()[-3:])
        return res
    lines = [json.loads(l) for l in open(f"{args.work}/run-{tag}/metrics.jsonl") if '"lr"' in l]
    timed = lines[1:]
    tok_s = sum(l["tokens"] for l in timed) / sum(l["tokens"] / l["tokens_per_s"] for l in timed)
    tokens_per_pair = sum(l["tokens"] for l in timed) / (4 * len(timed))
    res.update(tokens_per_s=round(tok_s), pairs_per_s=round(tok_s / tokens_per_pair, 2), tokens_per_pair=tokens_per_pair)
    return res


def unsloth_run(ckpt, precompute, fused):
    if not os.path.exists("/tmp/site"):
        wheels = [os.path.join(args.bench, "wheels", w) for w in os.listdir(os.path.join(args.bench, "wheels")) if w.endswith(".whl")]
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", "/tmp/site"] + wheels, check=True)
    env = dict(os.environ, PYTHONPATH="/tmp/site", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "unsloth_dpo.py"), "--bench", args.bench,
           "--model", args.model, "--pairs", pairs, "--pair-tokens", str(n), "--steps", str(args.steps), "--ckpt", ckpt]
    cmd += ["--precompute"] if precompute else []
    cmd += ["--fused-loss"] if fused else []
    log_path = os.path.join(args.out, f"unsloth_dpo-{args.model}-{ckpt}-{precompute}-{fused}.log")
    with open(log_path, "w") as log:
        rc, out, peak_mib = run_measured(cmd, env=env, log=log)
    res = next((json.loads(l) for l in out.splitlines() if l.startswith("{") and '"pairs_per_s"' in l), None)
    if res is None:
        return dict(system="unsloth+trl", model=args.model, ckpt=ckpt, precompute=bool(precompute), fused_loss=bool(fused),
                    error=f"exit {rc}: " + " | ".join(out.strip().splitlines()[-3:]))
    res["peak_gib"] = round(peak_mib / 1024, 2)
    return res


for pre in [int(p) for p in args.precompute.split(",")]:
    for ck in [c if c in ("auto", "offload") else bool(int(c)) for c in args.kiln_ckpt.split(",")]:
        record(kiln_run(ck, pre))
    if args.refs == "unsloth":
        for ck in args.ref_ckpt.split(","):
            for fused in [int(x) for x in args.fused_loss.split(",")]:
                record(unsloth_run(ck, pre, fused))

print(f"\n| {args.model} DPO | checkpointing | reference | pairs/s | tokens/pair | peak (driver) |")
print("|---|---|---|---|---|---|")
for r in results:
    name = r["system"] + (" (fused loss)" if r.get("fused_loss") else "")
    print(f"| {name} | {r['ckpt']} | {'precomputed' if r['precompute'] else 'live'} | "
          f"{r.get('pairs_per_s', r.get('error'))} | {r.get('tokens_per_pair', '')} | {r.get('peak_gib')} GiB |")
