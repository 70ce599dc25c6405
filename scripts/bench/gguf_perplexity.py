"""llama.cpp's perplexity of kiln's GGUF exports against transformers on the same tokens.

    cargo build --release
    $KILN_REFPY scripts/bench/gguf_perplexity.py [/path/to/llama.cpp]

For the tiny Llama, Qwen 2, Phi-3, Mistral, Gemma 2, Mixtral, Qwen 3 and Gemma fixtures: the text is the outputs of datasets/alpaca_tiny.jsonl
joined by blank lines. transformers (f32) scores it exactly as llama-perplexity does
(docs/reference-tools.md pitfall 1: chunks of CTX tokens, BOS written over each chunk's first token,
the second half of each chunk scored), and llama-perplexity runs on kiln's F32, Q8_0 and Q4_K_M
files with flash attention off and an f32 KV cache (pitfall 3). Prints a Markdown table for
BENCHMARKS.md. Versions: torch 2.11.0, transformers 5.17.0, llama.cpp 0c1e570.
"""
import json
import math
import os
import re
import subprocess
import sys
import tempfile

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KILN = os.path.join(ROOT, "target", "release", "kiln")
LLAMA = sys.argv[1] if len(sys.argv) > 1 else "/tmp/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp"
CTX = 64
MODELS = ["tests/fixtures/llama_tiny_a", "tests/fixtures/qwen2_tiny", "tests/fixtures/phi3_tiny",
          "tests/fixtures/mistral_tiny", "tests/fixtures/gemma2_tiny", "tests/fixtures/mixtral_tiny",
          "tests/fixtures/qwen3_tiny", "tests/fixtures/gemma_tiny", "tests/fixtures/qwen3moe_tiny"]
# MODELS=dir1,dir2 (Hugging Face directories with kiln's tiny tokenizer) scores others instead.
if os.environ.get("MODELS"):
    MODELS = os.environ["MODELS"].split(",")


def hf_perplexity(model_dir, text):
    tok = Tokenizer.from_file(os.path.join(ROOT, model_dir, "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=True).ids
    bos = ids[0]
    model = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, model_dir), dtype=torch.float32).eval()
    nll, n = 0.0, 0
    for c in range(len(ids) // CTX):
        chunk = ids[c * CTX:(c + 1) * CTX]
        chunk[0] = bos
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([chunk])).logits[0].double(), -1)
        for j in range(CTX // 2, CTX - 1):
            nll -= logp[j, chunk[j + 1]].item()
            n += 1
    return math.exp(nll / n), len(ids)


def llama_perplexity(gguf, text_file):
    out = subprocess.run([os.path.join(LLAMA, "build", "bin", "llama-perplexity"), "-m", gguf, "-f", text_file,
                          "-c", str(CTX), "-b", str(CTX), "-fa", "off", "-ctk", "f32", "-ctv", "f32",
                          "--no-escape", "-t", "2"], check=True, capture_output=True)
    log = out.stdout.decode() + out.stderr.decode()
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", log).group(1))


def main():
    rows = [json.loads(line) for line in open(os.path.join(ROOT, "datasets", "alpaca_tiny.jsonl"))]
    text = "\n\n".join(r["output"] for r in rows[:40]).strip()
    work = tempfile.mkdtemp()
    text_file = os.path.join(work, "text.txt")
    with open(text_file, "w") as f:
        f.write(text)
    print("| model | tokens | transformers f32 | kiln GGUF F32 | Q8_0 | Q4_K_M |")
    print("|---|---|---|---|---|---|")
    for model in MODELS:
        ref, n = hf_perplexity(model, text)
        cells = []
        for quant in ["f32", "q8_0", "q4_k_m"]:
            gguf = os.path.join(work, os.path.basename(model), quant, "model.gguf")
            subprocess.run([KILN, "export", "gguf", "--model", os.path.join(ROOT, model), "-o", gguf,
                            "--quant", quant], check=True, capture_output=True)
            cells.append(llama_perplexity(gguf, text_file))
        print(f"| {os.path.basename(model)} | {n} | {ref:.6f} | " + " | ".join(f"{c:.6f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
