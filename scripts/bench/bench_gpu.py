#!/usr/bin/env python3
"""kiln against the Python stack and Unsloth: the same QLoRA job, in one run, on one GPU.

Runs on the GPU machine from the repository root (see BENCHMARKS.md for the exact command):
    python3 scripts/bench/bench_gpu.py --kiln .carry/kiln --bench .carry/bench --models llama-3.2-1b,llama-3.1-8b

The job (shared/bench/README.md): random weights of the real architecture, NF4 + double quant,
bf16 compute, LoRA r=16 alpha=32 dropout 0.05 on q/k/v/o, sequence 2048, micro-batch 4,
gradient accumulation 4, AdamW lr 2e-4, grad clip 1.0, random token ids with labels = inputs,
one warm-up step, then timed steps. kiln gets the same rows: 2049 ids each, so the model runs
2048 positions per row as transformers does with `labels=input_ids`.

Peak memory is read the same way for every system: the largest `used_memory` nvidia-smi reports
for the process while it runs (polled every 100 ms); torch's own `max_memory_allocated` is shown
beside it for the Python systems. Prints one table at the end and writes bench_gpu.json.
"""
import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time

CONFIGS = {"llama-3.2-1b": "Llama-3.2-1B", "llama-3.2-3b": "Llama-3.2-3B", "llama-3.1-8b": "Llama-3.1-8B",
           "qwen3-8b": "Qwen3-8B"}
# Each model's tokenizer (Qwen 3 shares Qwen 2.5's vocabulary).
TOKENIZERS = {"qwen3-8b": "tests/fixtures/tokenizers/qwen2.5"}
TOKENIZER = "tests/fixtures/tokenizers/llama3-instruct"


class PeakMemory:
    """Polls nvidia-smi for the peak memory of a process tree's GPU contexts."""

    def __init__(self):
        self.peak_mib = 0
        self.pids = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=5).stdout
                total = 0
                for line in out.strip().splitlines():
                    pid, mib = [x.strip() for x in line.split(",")]
                    if not self.pids or int(pid) in self.pids:
                        total += int(mib)
                self.peak_mib = max(self.peak_mib, total)
            except Exception:
                pass
            time.sleep(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._thread.join()


def run_measured(cmd, env=None, log=None, all_processes=False):
    """Runs `cmd`, returns (returncode, stdout, peak MiB of GPU memory while it ran): of its own
    process, or of every process on the GPUs (`all_processes`)."""
    with PeakMemory() as mem:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        if not all_processes:
            mem.pids = {p.pid}
        lines = []
        for line in p.stdout:
            lines.append(line)
            if log:
                log.write(line)
                log.flush()
        p.wait()
    return p.returncode, "".join(lines), mem.peak_mib


def ckpt_value(ckpt):
    """A recipe value for kiln's gradient_checkpointing: True, False, "auto" or "offload"."""
    return f'"{ckpt}"' if ckpt in ("auto", "offload") else ("true" if ckpt else "false")


def model_dir(work, model):
    """A directory of `model`'s config.json and tokenizer (kiln makes random weights of its shapes)."""
    d = os.path.join(work, model)
    os.makedirs(d, exist_ok=True)
    shutil.copy(f"tests/fixtures/configs/{CONFIGS[model]}.json", os.path.join(d, "config.json"))
    tokenizer = TOKENIZERS.get(model, TOKENIZER)
    shutil.copy(os.path.join(tokenizer, "tokenizer_config.json"), d)
    with gzip.open(os.path.join(tokenizer, "tokenizer.json.gz")) as src, open(os.path.join(d, "tokenizer.json"), "wb") as dst:
        shutil.copyfileobj(src, dst)
    return d


def kiln_job(args, model, seq, micro, accum, steps, ckpt, work):
    if args.memory_only:
        steps = 0  # one step, the peak memory only
    d = model_dir(work, model)
    tokenizer = TOKENIZERS.get(model, TOKENIZER)
    # Token ids within both the embedding and the tokenizer's vocabulary.
    with gzip.open(os.path.join(tokenizer, "tokenizer.json.gz")) as f:
        tok = json.load(f)
    tok_size = max(max(tok["model"]["vocab"].values()), max(t["id"] for t in tok["added_tokens"])) + 1
    vocab = min(json.load(open(os.path.join(d, "config.json")))["vocab_size"], tok_size)
    rng = random.Random(0)
    data = os.path.join(work, f"tokens-{seq}.jsonl")
    rows = (steps + 1) * micro * accum * args.gpus
    with open(data, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"input_ids": [rng.randrange(vocab) for _ in range(seq + 1)]}) + "\n")
    tag = f"{model}-{seq}-{micro}-{ckpt}" + (f"-{args.gpus}gpus" if args.gpus > 1 else "")
    distill = ""
    if args.distill_teacher:
        # Distillation: a random teacher of these shapes (NF4), the same tokenizer.
        tag += f"-distill-{args.distill_teacher}"
        distill = f"""
[distill]
teacher = "{model_dir(work, args.distill_teacher)}"
teacher_quantize = "nf4"
alpha = 0.5
temperature = 2.0
"""
    out = os.path.join(work, f"run-{tag}")
    recipe = os.path.join(work, f"{tag}.toml")
    with open(recipe, "w") as f:
        f.write(f"""
[model]
path = "{d}"
random_weights = true
quantize = "nf4"
compute_dtype = "bf16"
device = "cuda"
[data]
path = "{data}"
format = "tokens"
max_seq_len = {seq + 1}
packing = false
shuffle = false
[lora]
r = 16
lora_alpha = 32
lora_dropout = 0.05
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
[training]
micro_batch_size = {micro}
gradient_accumulation_steps = {accum}
learning_rate = 2e-4
lr_scheduler = "constant"
max_steps = {steps + 1}
max_grad_norm = 1.0
gradient_checkpointing = {ckpt_value(ckpt)}
[output]
dir = "{out}"
{distill}""")
    env = dict(os.environ, LD_LIBRARY_PATH="/usr/local/cuda/lib64:" + os.environ.get("LD_LIBRARY_PATH", ""))
    cmd = [args.kiln, "train", recipe, "--quiet"] + (["--gpus", str(args.gpus)] if args.gpus > 1 else [])
    if args.distill_teacher and args.teacher_device:
        cmd += ["--teacher-device", args.teacher_device]
        tag += "-teacher-" + args.teacher_device.replace(":", "")
    if args.kernel_profile:
        # One steady-state step (the second) under Nsight Compute, kernel durations only.
        env["KILN_CUDA_PROFILE_STEP"] = "2"
        ncu_csv = os.path.join(args.out, f"ncu-{model}-{seq}-{micro}-{ckpt}.csv")
        cmd = ["ncu", "--clock-control", "none", "--profile-from-start", "off", "--metrics",
               "gpu__time_duration.sum", "--csv", "--log-file", ncu_csv] + cmd
    t0 = time.time()
    with open(os.path.join(args.out, f"kiln-{tag}.log"), "w") as log:
        # Several GPUs: the ranks are the launcher's children; the peak is over all processes,
        # reported per GPU.
        rc, text, peak = run_measured(cmd, env=env, log=log, all_processes=args.gpus > 1)
    peak /= args.gpus
    if args.kernel_profile and rc == 0:
        summarize_kernels(ncu_csv, os.path.join(args.out, f"kernels-{model}-{seq}-{micro}-{ckpt}.txt"))
    wall = time.time() - t0
    res = dict(system="kiln", model=model, seq=seq, micro_batch=micro, grad_accum=accum, grad_ckpt=ckpt, gpus=args.gpus,
               distill_teacher=args.distill_teacher or None,
               peak_mem_gib=round(peak / 1024, 2), wall_s=round(wall, 1))
    if rc != 0:
        tail = text.strip().splitlines()[-3:]
        res["error"] = "OOM" if "out of memory" in text.lower() else " | ".join(tail)
        return res
    metrics = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    if args.memory_only:
        res.update(first_step_s=round(metrics[0]["elapsed_s"], 1), last_loss=round(metrics[0]["loss"], 4))
        return res
    timed = metrics[1:]  # step 1 is the warm-up
    elapsed = timed[-1]["elapsed_s"] - metrics[0]["elapsed_s"]
    tokens = sum(m["tokens"] for m in timed)
    res.update(tokens_per_s=round(tokens / elapsed, 1), step_s=round(elapsed / len(timed), 3),
               last_loss=round(timed[-1]["loss"], 4), tokens_per_step=timed[-1]["tokens"])
    return res


def summarize_kernels(csv_path, out_path):
    """Sums Nsight Compute's per-launch durations by kernel name; writes and prints the table."""
    import csv
    rows = [l for l in open(csv_path) if l.startswith('"')]
    total, by_name = 0.0, {}
    for r in csv.DictReader(rows):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        ns = float(r["Metric Value"].replace(",", "")) * {"nsecond": 1, "usecond": 1e3, "msecond": 1e6}.get(r.get("Metric Unit", "nsecond"), 1)
        name = r["Kernel Name"].split("(")[0][:90]
        t, n = by_name.get(name, (0.0, 0))
        by_name[name] = (t + ns, n + 1)
        total += ns
    lines = [f"total {total / 1e6:.1f} ms in {sum(n for _, n in by_name.values())} launches"]
    for name, (t, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"{t / 1e6:9.2f} ms {100 * t / max(total, 1):5.1f}% {n:6d}x  {name}")
    open(out_path, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines[:40]), flush=True)


def python_jobs(args, script, model, flags):
    env = dict(os.environ, PYTHONPATH="/tmp/site", PYTHONUNBUFFERED="1", OUT=args.out)
    cmd = [sys.executable, os.path.join(args.bench, script), "--models", model, "--steps", str(args.steps)] + flags
    with open(os.path.join(args.out, f"{script}-{model}.log"), "w") as log:
        rc, text, peak = run_measured(cmd, env=env, log=log)
    results = []
    for line in text.splitlines():
        if line.startswith("{") and '"model"' in line:
            r = json.loads(line)
            r["torch_peak_gib"] = r.pop("peak_mem_gib", None)
            # One process runs every configuration: the driver's peak is that of the largest.
            r["process_peak_gib"] = round(peak / 1024, 2)
            results.append(r)
    if not results:
        results.append(dict(system=script, model=model, error=f"exit {rc}: " + " | ".join(text.strip().splitlines()[-3:])))
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", default=".carry/kiln")
    ap.add_argument("--bench", default=".carry/bench", help="a copy of shared/bench")
    ap.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b")
    ap.add_argument("--refs", default="hf,unsloth", help="hf, unsloth, or none")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    ap.add_argument("--kiln-ckpt", default="1", help="kiln's gradient_checkpointing settings: 1, 0, auto, or several (0,1,auto)")
    ap.add_argument("--longctx", default="", help="also: 8B at micro-batch 1, these sequence lengths")
    ap.add_argument("--longctx-ckpt", default="1",
                    help="kiln's checkpointing for --longctx: 1, offload, both (1,offload), or none (the references alone)")
    ap.add_argument("--longctx-model", default="llama-3.1-8b", help="the model --longctx runs")
    ap.add_argument("--accum", type=int, default=4, help="kiln's gradient accumulation (the shared job: 4)")
    ap.add_argument("--gpus", type=int, default=1, help="kiln on this many GPUs (kiln train --gpus N); each step then takes micro x accum x N rows")
    ap.add_argument("--memory-only", action="store_true",
                    help="kiln runs one step and reports its peak memory only (the longest sequence that fits)")
    ap.add_argument("--distill-teacher", default="",
                    help="kiln's jobs distil from a random teacher of this model's shapes (e.g. llama-3.1-8b; NF4, alpha 0.5, T 2)")
    ap.add_argument("--teacher-device", default="", help="with --distill-teacher: run the teacher there (e.g. cuda:1)")
    ap.add_argument("--kernel-profile", action="store_true",
                    help="run kiln's second step under ncu and sum its kernels' durations by name (speed numbers then mean nothing)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--work", default="/tmp/kiln-bench")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    refs = [r for r in args.refs.split(",") if r and r != "none"]
    if refs and not os.path.exists("/tmp/site"):
        wheels = [os.path.join(args.bench, "wheels", w) for w in os.listdir(os.path.join(args.bench, "wheels")) if w.endswith(".whl")]
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", "/tmp/site"] + wheels, check=True)
    results = []

    def record(r):
        results.append(r)
        print(json.dumps(r), flush=True)
        with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
            json.dump(results, f, indent=1)

    for model in [m for m in args.models.split(",") if m and m != "none"]:
        for ck in [c if c == "auto" else bool(int(c)) for c in args.kiln_ckpt.split(",")]:
            record(kiln_job(args, model, 2048, 4, args.accum, args.steps, ck, args.work))
        if "hf" in refs:
            for r in python_jobs(args, "hf_qlora_bench.py", model, ["--ckpt", "1"]):
                record(r)
        if "unsloth" in refs:
            for r in python_jobs(args, "unsloth_bench.py", model, ["--ckpt", "0,unsloth"]):
                record(r)
    for seq in [int(s) for s in args.longctx.split(",") if s]:
        for ck in args.longctx_ckpt.split(","):
            if ck == "none":
                continue
            ck = ck if ck == "offload" else bool(int(ck))
            r = kiln_job(args, args.longctx_model, seq, 1, 1, max(1, args.steps - 1), ck, args.work)
            r["longctx"] = True
            record(r)
        if "unsloth" in refs:
            # The same sequence beside kiln: Unsloth with its offloaded checkpoints.
            flags = ["--seq", str(seq), "--micro", "1", "--accum", "1", "--ckpt", "unsloth"]
            if args.memory_only:
                flags += ["--steps", "1"]  # later --steps wins: the warm-up and one step
            for r in python_jobs(args, "unsloth_bench.py", args.longctx_model, flags):
                r.update(longctx=True, seq=seq, peak_mem_gib=r.get("process_peak_gib"))
                record(r)

    print("\n| model | system | checkpointing | tokens/s | peak GPU memory (driver) | torch peak | kiln tokens/s ratio | kiln memory ratio (driver) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if r.get("longctx"):
            continue
        kiln = next((k for k in results if k["system"] == "kiln" and k["model"] == r["model"]
                     and k.get("tokens_per_s") and not k.get("longctx")), None)
        ratio, mem_ratio = "", ""
        peak = r.get("peak_mem_gib", r.get("process_peak_gib"))
        if kiln and r.get("tokens_per_s") and r["system"] != "kiln":
            ratio = f"{kiln['tokens_per_s'] / r['tokens_per_s']:.2f}x"
            if peak:
                mem_ratio = f"{kiln['peak_mem_gib'] / peak:.2f}x"
        tps = r.get("tokens_per_s", r.get("error", ""))
        print(f"| {r['model']} | {r['system']} | {r.get('grad_ckpt')} | {tps} | {peak} GiB | {r.get('torch_peak_gib', '')} | {ratio} | {mem_ratio} |")
    longs = [r for r in results if r.get("longctx")]
    if longs:
        print("\n| micro-batch 1 | sequence | checkpointing | tokens/s | peak GPU memory (driver) |")
        print("|---|---|---|---|---|")
        for r in longs:
            print(f"| {r['model']} {r['system']} | {r['seq']} | {r.get('grad_ckpt')} | {r.get('tokens_per_s', r.get('error'))} | {r.get('peak_mem_gib')} GiB |")


if __name__ == "__main__":
    main()
