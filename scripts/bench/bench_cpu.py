#!/usr/bin/env python3
"""kiln against transformers + PEFT (+ bitsandbytes NF4) on the CPU: the same QLoRA job, one after
the other in one command (the CPU job of BENCHMARKS.md).

    cargo build --release
    $KILN_REFPY scripts/bench/bench_cpu.py            # the reference venv of docs/reference-tools.md
    $KILN_REFPY scripts/bench/bench_cpu.py --steps 8 --skip-python

The job: a tiny random Llama made by `kiln init-tiny --config` (hidden 96, 3 layers, 6 query / 2
key-value heads, intermediate 288, GPT-2's vocabulary of 50,257, untied), random token rows
(`tokens` format, 257 ids so both run 256 positions), sequence 256, micro-batch 4, LoRA r=16
alpha=32 on q/k/v/o, dropout 0, no checkpointing, NF4 base (double quantization), f32 compute,
AdamW lr 2e-4. One warm-up step, then timed steps; tokens/s over the timed steps. Threads: all
cores, for both.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 96,
          "intermediate_size": 288, "num_hidden_layers": 3, "num_attention_heads": 6,
          "num_key_value_heads": 2, "vocab_size": 50257, "max_position_embeddings": 2048,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
          "bos_token_id": 50256, "eos_token_id": 50256, "torch_dtype": "float32"}
SEQ, MICRO = 256, 4


def make_job(work, steps):
    cfg = os.path.join(work, "config.json")
    json.dump(CONFIG, open(cfg, "w"))
    model = os.path.join(work, "model")
    subprocess.run([os.path.join(ROOT, "target", "release", "kiln"), "init-tiny", "--config", cfg, "-o", model],
                   check=True, capture_output=True)
    tok = os.path.join(ROOT, "tests", "fixtures", "tokenizers", "gpt2")
    for f in os.listdir(tok):
        shutil.copy(os.path.join(tok, f), model)
    if os.path.exists(os.path.join(model, "tokenizer.json.gz")):
        subprocess.run(["gunzip", "-f", os.path.join(model, "tokenizer.json.gz")], check=True)
    rng = random.Random(0)
    rows = [[rng.randrange(CONFIG["vocab_size"]) for _ in range(SEQ + 1)] for _ in range(MICRO * (steps + 1))]
    data = os.path.join(work, "rows.jsonl")
    with open(data, "w") as f:
        for r in rows:
            f.write(json.dumps({"input_ids": r}) + "\n")
    return model, data, rows


def kiln(work, model, data, steps):
    recipe = os.path.join(work, "recipe.toml")
    out = os.path.join(work, "run")
    with open(recipe, "w") as f:
        f.write(f"""[model]
path = "{model}"
device = "cpu"
quantize = "nf4"
compute_dtype = "f32"
[data]
path = "{data}"
format = "tokens"
max_seq_len = {SEQ + 1}
shuffle = false
[lora]
r = 16
lora_alpha = 32
lora_dropout = 0.0
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
[training]
micro_batch_size = {MICRO}
gradient_accumulation_steps = 1
learning_rate = 2e-4
lr_scheduler = "constant"
max_steps = {steps + 1}
gradient_checkpointing = false
[output]
dir = "{out}"
""")
    subprocess.run([os.path.join(ROOT, "target", "release", "kiln"), "train", recipe, "-q"], check=True)
    m = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    timed = m[1:]
    elapsed = timed[-1]["elapsed_s"] - m[0]["elapsed_s"]
    return sum(x["tokens"] for x in timed) / elapsed, [round(x["loss"], 4) for x in m]


def python_stack(model, rows, steps, nf4):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(os.cpu_count())
    kw = {}
    if nf4:
        from transformers import BitsAndBytesConfig
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **kw)
    if nf4:
        # docs/reference-tools.md pitfall 8: the plain NF4 path on AVX512-BF16 CPUs.
        for mod in m.modules():
            if hasattr(mod, "support_avx512bf16_for_cpu"):
                mod.support_avx512bf16_for_cpu = False
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4)
    m.train()
    losses, t0 = [], None
    for s in range(steps + 1):
        if s == 1:
            t0 = time.time()
        ids = torch.tensor(rows[s * MICRO:(s + 1) * MICRO])
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(round(out.loss.item(), 4))
    return steps * MICRO * SEQ / (time.time() - t0), losses


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed steps after the warm-up step")
    ap.add_argument("--skip-python", action="store_true")
    args = ap.parse_args()
    work = tempfile.mkdtemp()
    model, data, rows = make_job(work, args.steps)
    results = {"kiln": kiln(work, model, data, args.steps)}
    if not args.skip_python:
        results["transformers + PEFT + bitsandbytes NF4"] = python_stack(model, rows, args.steps, True)
        results["transformers + PEFT, f32 base"] = python_stack(model, rows, args.steps, False)
    shutil.rmtree(work)
    print("\n| system | tokens/s | kiln ÷ this | first losses |\n|---|---|---|---|")
    k = results["kiln"][0]
    for name, (tps, losses) in results.items():
        print(f"| {name} | {tps:,.0f} | {k / tps:.2f}x | {losses[:3]} |")


if __name__ == "__main__":
    sys.exit(main())
