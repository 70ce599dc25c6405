"""Golden logits, perplexity and greedy generations for `kiln eval` / `kiln generate`.

    $KILN_REFPY scripts/golden/make_eval_golden.py
(venv: torch 2.11.0, transformers 5.17.0, peft 0.21.0; CPU, f32)

On tests/fixtures/llama_tiny_a (made by make_llama_golden.py):
  tests/fixtures/peft_adapter_a/        a PEFT LoRA adapter (r=8, alpha=16, q/k/v/o + gate/down,
                                        init_lora_weights=False so B is not zero), saved by PEFT
  tests/fixtures/eval_golden.safetensors
      {base,adapter}.logits     f32 [T, V]: logits of `eval_text` (bos + text + eos)
      {base,adapter}.generated  i64 [N]: greedy continuation of `prompt` (model.generate, no sampling)
      input_ids, prompt_ids     i64
  tests/fixtures/eval_golden.json      text, prompt, mean loss and perplexity of each model
"""
import json

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM

FIX = "tests/fixtures"
MODEL = f"{FIX}/llama_tiny_a"
ADAPTER = f"{FIX}/peft_adapter_a"

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n"
        "How vexingly quick daft zebras jump; 12 + 30 = 42.")
PROMPT = "Once upon a time"
NEW_TOKENS = 24

torch.manual_seed(1)
tok = Tokenizer.from_file(f"{MODEL}/tokenizer.json")
# As a transformers user gets them: the tokenizer's post-processor adds <|begin_of_text|>, and
# the text ends with config.json's eos_token_id (1).
eos = 1
ids = tok.encode(TEXT).ids + [eos]
prompt_ids = tok.encode(PROMPT).ids

base = LlamaForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
model = get_peft_model(base, config)
model.save_pretrained(ADAPTER)
model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(MODEL, dtype=torch.float32), ADAPTER).eval()
base = LlamaForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()

out = {"input_ids": torch.tensor(ids), "prompt_ids": torch.tensor(prompt_ids)}
report = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
          "text": TEXT, "prompt": PROMPT, "new_tokens": NEW_TOKENS}
for name, m in (("base", base), ("adapter", model)):
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([ids])).logits[0].float()
        loss = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="mean")
        gen = m.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=eos)[0, len(prompt_ids):]
    out[f"{name}.logits"] = logits.contiguous()
    out[f"{name}.generated"] = gen.contiguous()
    report[name] = {"loss": loss.item(), "perplexity": torch.exp(loss).item(), "generated": gen.tolist()}
    print(name, report[name])
save_file(out, f"{FIX}/eval_golden.safetensors")
json.dump(report, open(f"{FIX}/eval_golden.json", "w"), indent=1)
