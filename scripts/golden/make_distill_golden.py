"""Golden distillation losses and LoRA gradients for kiln's `[distill]`, from PyTorch.

    $KILN_REFPY scripts/golden/make_distill_golden.py
(venv: torch 2.11.0, transformers 5.17.0, peft 0.21.0; CPU, f32)

Student: tests/fixtures/llama_tiny_a with tests/fixtures/peft_adapter_a (PEFT, B not zero).
Teacher: tests/fixtures/llama_tiny_b (bf16 weights, read in f32), the same tokenizer.
Two rows of token ids of different lengths (right-padded), a loss mask that leaves out each row's
first tokens (a "prompt") and the padding. For each loss in forward_kl, reverse_kl and jsd, and
each (alpha, temperature) below:

    loss = [ alpha * T^2 * sum_i w_i D(teacher_T(i), student_T(i)) + (1 - alpha) * sum_i w_i CE_i ] / sum_i w_i

with teacher_T = softmax(teacher logits / T), student_T likewise, on target positions only, and
D one of KL(teacher || student), KL(student || teacher), and the Jensen-Shannon divergence
(1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2). Writes

  tests/fixtures/distill_golden.safetensors
      input_ids i64 [2, T+1] (row 1 padded with 0), mask u8 [2, T+1] (1 = the token is a target)
      {case}.loss / {case}.kl / {case}.ce   f32 [] (kl and ce are means over the targets)
      {case}.{PEFT parameter name}          f32 gradient of loss
  tests/fixtures/distill_golden.json        the cases and the versions
"""
import json

import peft
import torch
import torch.nn.functional as F
import transformers
from peft import PeftModel
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

FIX = "tests/fixtures"
torch.manual_seed(3)

student = PeftModel.from_pretrained(
    LlamaForCausalLM.from_pretrained(f"{FIX}/llama_tiny_a", dtype=torch.float32), f"{FIX}/peft_adapter_a",
    is_trainable=True)
student.eval()  # no dropout (the adapter's is 0 anyway)
teacher = LlamaForCausalLM.from_pretrained(f"{FIX}/llama_tiny_b", dtype=torch.float32).eval()

# Two rows: 30 and 22 tokens; the first 6 / 4 tokens are the "prompt" (not targets).
g = torch.Generator().manual_seed(11)
lengths, prompts = [30, 22], [6, 4]
T1 = max(lengths)
ids = torch.zeros(2, T1, dtype=torch.long)
mask = torch.zeros(2, T1, dtype=torch.uint8)
for r, (n, p) in enumerate(zip(lengths, prompts)):
    ids[r, :n] = torch.randint(2, 512, (n,), generator=g)
    mask[r, p:n] = 1

inputs, targets = ids[:, :-1], ids[:, 1:]
w = mask[:, 1:].float()
attn = torch.zeros(2, T1 - 1, dtype=torch.long)
for r, n in enumerate(lengths):
    attn[r, : n - 1] = 1


def divergence(kind, lt, ls):
    """Per-position divergence of log-probabilities lt (teacher) and ls (student)."""
    p, q = lt.exp(), ls.exp()
    if kind == "forward_kl":
        return (p * (lt - ls)).sum(-1)
    if kind == "reverse_kl":
        return (q * (ls - lt)).sum(-1)
    lm = torch.log((p + q) / 2)
    return 0.5 * (p * (lt - lm)).sum(-1) + 0.5 * (q * (ls - lm)).sum(-1)


CASES = [(kind, 0.5, 2.0) for kind in ("forward_kl", "reverse_kl", "jsd")] + [("forward_kl", 0.3, 1.0), ("jsd", 1.0, 1.5)]
tensors = {"input_ids": ids, "mask": mask}
cases = []
with torch.no_grad():
    zt = teacher(input_ids=inputs, attention_mask=attn).logits
for kind, alpha, temp in CASES:
    name = f"{kind}-a{alpha}-t{temp}"
    student.zero_grad()
    zs = student(input_ids=inputs, attention_mask=attn).logits
    lt = F.log_softmax(zt / temp, -1)
    ls = F.log_softmax(zs / temp, -1)
    d = divergence(kind, lt, ls)
    ce = F.cross_entropy(zs.reshape(-1, zs.shape[-1]), targets.reshape(-1), reduction="none").reshape(w.shape)
    n = w.sum()
    kl_sum, ce_sum = (w * d).sum(), (w * ce).sum()
    loss = (alpha * temp ** 2 * kl_sum + (1 - alpha) * ce_sum) / n
    loss.backward()
    tensors[f"{name}.loss"] = loss.detach().reshape(())
    tensors[f"{name}.kl"] = (kl_sum / n).detach().reshape(())
    tensors[f"{name}.ce"] = (ce_sum / n).detach().reshape(())
    grads = 0
    for pname, p in student.named_parameters():
        if p.requires_grad:
            # PEFT's saved names: without the adapter name.
            key = pname.replace(".default", "")
            tensors[f"{name}.{key}"] = p.grad.detach().clone()
            grads += 1
    cases.append(dict(name=name, loss=kind, alpha=alpha, temperature=temp, value=loss.item(),
                      kl=(kl_sum / n).item(), ce=(ce_sum / n).item(), gradients=grads))
    print(name, loss.item(), (kl_sum / n).item(), (ce_sum / n).item(), grads)

save_file({k: v.contiguous() for k, v in tensors.items()}, f"{FIX}/distill_golden.safetensors")
json.dump(dict(cases=cases, targets=int(w.sum().item()),
               versions=dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)),
          open(f"{FIX}/distill_golden.json", "w"), indent=1)
