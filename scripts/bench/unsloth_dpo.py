"""Unsloth + TRL's DPOTrainer on the job of scripts/bench/dpo_gpu.py: the same pairs file, the same
random-weight architecture, NF4 + double quant, bf16, LoRA r16 alpha 32 on q/k/v/o, micro-batch 4
pairs, DPO sigmoid with beta 0.1 and the adapter-off reference (TRL's default under PEFT).

Runs on the GPU machine, started by dpo_gpu.py with --refs unsloth (wheels installed into /tmp/site
from a copy of shared/bench, as scripts/bench/bench_gpu.py does it):

    PYTHONPATH=/tmp/site python3 scripts/bench/unsloth_dpo.py --bench .carry/bench \
        --model llama-3.2-1b --pairs /tmp/kiln-dpo-bench/pairs.jsonl --steps 8 --ckpt unsloth

Prints one JSON line: pairs/s over the steps after the first, and torch's peak. The driver's peak is
read by the parent (dpo_gpu.py). TRL turns dropout off in DPO (`disable_dropout`), so the adapter's
dropout is 0 here and in kiln's recipe.
"""
import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--bench", default=".carry/bench", help="a copy of shared/bench (unsloth_bench.py makes the model)")
ap.add_argument("--model", default="llama-3.2-1b")
ap.add_argument("--pairs", required=True)
ap.add_argument("--pair-tokens", type=int, default=1024)
ap.add_argument("--steps", type=int, default=8)
ap.add_argument("--ckpt", default="unsloth", help="use_gradient_checkpointing: unsloth, 1 or 0")
ap.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs=True")
ap.add_argument("--fused-loss", action="store_true", help="UNSLOTH_FUSED_PREFERENCE_LOSS=1 (Unsloth's opt-in chunked head)")
ap.add_argument("--work", default="/tmp/unsloth-dpo-bench")
a = ap.parse_args()

sys.path.insert(0, os.path.abspath(a.bench))
import unsloth_bench  # noqa: E402  (sets Unsloth's offline environment; imports nothing heavy)

path = os.path.join(a.work, a.model)
if not os.path.isfile(os.path.join(path, "model.safetensors")) and not os.path.isfile(
        os.path.join(path, "model.safetensors.index.json")):
    # The model is made in a child process: transformers must not be imported before unsloth here.
    subprocess.run([sys.executable, os.path.join(a.bench, "unsloth_bench.py"), "--_make", a.model, path, "cuda"], check=True)
    # kiln's tokenizer (Llama 3) in place of the GPT-2 one, so both tokenize the pairs alike.
    for f in ("vocab.json", "merges.txt"):
        if os.path.exists(os.path.join(path, f)):
            os.remove(os.path.join(path, f))
    tok = "tests/fixtures/tokenizers/llama3-instruct"
    shutil.copy(os.path.join(tok, "tokenizer_config.json"), path)
    with gzip.open(os.path.join(tok, "tokenizer.json.gz")) as src, open(os.path.join(path, "tokenizer.json"), "wb") as dst:
        shutil.copyfileobj(src, dst)
if a.fused_loss:
    os.environ["UNSLOTH_FUSED_PREFERENCE_LOSS"] = "1"

from unsloth import FastLanguageModel  # noqa: E402  (before trl, as Unsloth requires)
import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

ckpt = {"unsloth": "unsloth", "1": True, "0": False}[a.ckpt]
model, tokenizer = FastLanguageModel.from_pretrained(path, max_seq_length=a.pair_tokens, dtype=torch.bfloat16,
                                                     load_in_4bit=True, local_files_only=True)
model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                         use_gradient_checkpointing=ckpt, random_state=0, max_seq_length=a.pair_tokens)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token


class StepTimes(TrainerCallback):
    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self.ends.append(time.time())


times = StepTimes()
config = DPOConfig(output_dir=os.path.join(a.work, "out"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                   learning_rate=2e-4, lr_scheduler_type="constant", max_steps=a.steps, logging_steps=1,
                   save_strategy="no", report_to="none", bf16=True, max_length=a.pair_tokens, beta=0.1,
                   loss_type=["sigmoid"], precompute_ref_log_probs=a.precompute, max_grad_norm=1.0, seed=0)
train = load_dataset("json", data_files=a.pairs, split="train")
trainer = DPOTrainer(model=model, ref_model=None, args=config, train_dataset=train, processing_class=tokenizer,
                     callbacks=[times])
torch.cuda.reset_peak_memory_stats()
trainer.train()
ends = times.ends  # the first step (compilation, warm-up) is left out of the rate
pairs_s = 4 * (len(ends) - 1) / (ends[-1] - ends[0])
rows = trainer.train_dataset
tokens_per_pair = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows) / len(rows)
print(json.dumps({"system": "unsloth+trl", "model": a.model, "ckpt": a.ckpt, "precompute": a.precompute,
                  "fused_loss": a.fused_loss, "pairs_per_s": round(pairs_s, 2), "tokens_per_pair": tokens_per_pair,
                  "torch_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                  "unsloth": __import__("unsloth").__version__, "trl": __import__("trl").__version__}), flush=True)
