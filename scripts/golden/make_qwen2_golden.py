"""Golden logits for kiln's Qwen 2 forward pass, from Hugging Face transformers.

    $KILN_REFPY scripts/golden/make_qwen2_golden.py
(venv: torch 2.11.0, transformers 5.17.0; CPU, f32)

Writes a tiny random Qwen2ForCausalLM as transformers saves it (q/k/v biases, tied embeddings,
GQA 4/2, rope_theta 1e6, no sliding window) and its logits:
  tests/fixtures/qwen2_tiny/               f32, one file, with kiln's tiny tokenizer
  tests/fixtures/qwen2_logits.safetensors  input_ids (i64 [2,T]), logits (f32 [2,T,V]),
                                           adapter.logits (with the adapter below)
  tests/fixtures/peft_adapter_qwen2/       a PEFT 0.21 LoRA (r=8, alpha=16, all seven projections,
                                           init_lora_weights=False so B is not zero)
Scaled init as scripts/golden/make_llama_golden.py, and biases N(0, 0.5²), so that dropping the
biases shows in the logits.
"""
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from family_golden import FIX, input_ids, logits_with_adapter, save_logits, save_model, scaled_init

torch.manual_seed(0)
OUT = f"{FIX}/qwen2_tiny"
ADAPTER = f"{FIX}/peft_adapter_qwen2"

config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                     use_sliding_window=False, bos_token_id=506, eos_token_id=507)
model = Qwen2ForCausalLM(config).eval()
scaled_init(model)
save_model(model, OUT)
ids = input_ids()
logits, adapter_logits = logits_with_adapter(
    Qwen2ForCausalLM, OUT, ADAPTER,
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], ids)
save_logits(f"{FIX}/qwen2_logits.safetensors", {"input_ids": ids, "logits": logits, "adapter.logits": adapter_logits})
print(open(f"{OUT}/config.json").read())
