"""Golden logits for kiln's Llama forward pass, from Hugging Face transformers.

    $KILN_REFPY scripts/golden/make_llama_golden.py
(venv: torch 2.11.0, transformers 5.17.0; CPU, f32)

Writes two tiny random Llama models as transformers saves them, and their logits:
  tests/fixtures/llama_tiny_a/   f32, one file, untied lm_head, llama3 rope scaling, GQA 4/2
  tests/fixtures/llama_tiny_b/   bf16, sharded (index.json), tied embeddings, head_dim != hidden/heads
  tests/fixtures/llama_logits.safetensors   {a,b}.input_ids (i64 [2,T]), {a,b}.logits (f32 [2,T,V])
The init is scaled (see docs/reference-tools.md pitfall 9) so a wrong norm, RoPE or
GQA mapping shows in the logits.
"""
import json
import shutil

import torch
import transformers
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
FIX = "tests/fixtures"
TOKENIZER = "src/model/tiny_tokenizer.json"


def scaled_init(model):
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            elif p.dim() == 2:
                fan_in = p.shape[1]
                gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
                p.normal_(0.0, gain / fan_in ** 0.5)


def make(name, dtype, shard, **cfg):
    config = LlamaConfig(vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-5,
                         bos_token_id=0, eos_token_id=1, **cfg)
    model = LlamaForCausalLM(config).eval()
    scaled_init(model)
    model = model.to(dtype)
    out = f"{FIX}/{name}"
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, max_shard_size="40KB" if shard else "1GB", safe_serialization=True)
    shutil.copy(TOKENIZER, f"{out}/tokenizer.json")
    # Logits in f32 from the weights as stored (bf16 for b), loaded back as a user would.
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 512, (2, 40), generator=g)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return {f"{name[-1]}.input_ids": ids, f"{name[-1]}.logits": logits.contiguous()}


tensors = {}
tensors.update(make("llama_tiny_a", torch.float32, False, hidden_size=64, intermediate_size=160,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    tie_word_embeddings=False, rope_theta=10000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}))
tensors.update(make("llama_tiny_b", torch.bfloat16, True, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                    tie_word_embeddings=True, rope_theta=500000.0))
save_file(tensors, f"{FIX}/llama_logits.safetensors",
          metadata={"torch": torch.__version__, "transformers": transformers.__version__})
for n in ("a", "b"):
    print(n, json.load(open(f"{FIX}/llama_tiny_{n}/config.json")))
