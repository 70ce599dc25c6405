"""Shared steps of the per-family golden scripts (make_{qwen2,phi3,gemma2,mixtral,mistral}_golden.py):
the scaled random init, saving with kiln's tiny tokenizer, and logits with and without a PEFT
adapter. Versions: torch 2.11.0, transformers 5.17.0, peft 0.21.0 (CPU, f32).
"""
import os
import shutil

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

FIX = "tests/fixtures"
GAIN_NAMES = ("q_proj", "k_proj", "qkv_proj")


def scaled_init(model, gemma_norms=False):
    """Embeddings N(0,1), weights N(0, gain²/fan_in) (gain 2 for q/k), biases N(0, 0.5²), norms
    1 + N(0, 0.2²) (Gemma, which multiplies by 1 + w: N(0, 0.2²)); see docs/reference-tools.md pitfall 9."""
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                if gemma_norms:
                    p.normal_(0.0, 0.2)
                else:
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif p.dim() >= 2:
                gain = 2.0 if any(k in name for k in GAIN_NAMES) else 1.0
                p.normal_(0.0, gain / p.shape[-1] ** 0.5)


def save_model(model, out):
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy("src/model/tiny_tokenizer.json", f"{out}/tokenizer.json")


def input_ids():
    return torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(7))


def logits_with_adapter(cls, out, adapter, targets, ids, **load):
    """Writes a PEFT LoRA (r=8, alpha=16, init_lora_weights=False so B is not zero) on `targets`
    of the model saved at `out` to `adapter`, and returns the base's and the adapted logits."""
    base = cls.from_pretrained(out, dtype=torch.float32, **load).eval()
    with torch.no_grad():
        logits = base(input_ids=ids).logits
    shutil.rmtree(adapter, ignore_errors=True)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False, target_modules=targets)
    get_peft_model(cls.from_pretrained(out, dtype=torch.float32), lora).save_pretrained(adapter)
    os.remove(f"{adapter}/README.md")  # PEFT's model card
    adapted = PeftModel.from_pretrained(cls.from_pretrained(out, dtype=torch.float32, **load), adapter).eval()
    with torch.no_grad():
        adapter_logits = adapted(input_ids=ids).logits
    return logits, adapter_logits


def save_logits(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path,
              metadata={"torch": torch.__version__, "transformers": transformers.__version__,
                        "peft": peft.__version__})
