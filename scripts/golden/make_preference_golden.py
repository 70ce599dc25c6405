"""Golden preference training runs for kiln's DPO, SimPO and ORPO, from TRL.

    $KILN_REFPY scripts/golden/make_preference_golden.py
(venv: torch 2.11.0, transformers 5.17.0, peft 0.21.0, trl 1.15.0; CPU, f32)

Writes tests/fixtures/preference/:
  model/        tests/fixtures/llama_tiny_a with a tokenizer_config.json naming its special tokens and
                Llama 3.1 8B Instruct's chat template (from llama.cpp's models/templates)
  adapter/      a PEFT LoRA (r=8, alpha=16, q/k/v/o) as PEFT initializes it (B = 0): training refines
                it, so TRL's reference is a frozen copy of it, and so is kiln's
  text.jsonl    prompt/chosen/rejected as text
  implicit.jsonl  chosen/rejected whole texts, the prompt shared
  chat.jsonl    prompt/chosen/rejected as messages, through the chat template
  golden.json   per case: the tokenized pairs, every step's loss and logged metrics, and the
                first step's LoRA gradients (lora_B; lora_A's are zero while B is)

DPO runs TRL's DPOTrainer itself (tokenization, loss, AdamW). SimPO and ORPO are TRL's CPOTrainer
(`loss_type="simpo"`, `cpo_alpha=0`) and ORPOTrainer losses (`cpo_loss`, `odds_ratio_loss`,
`get_batch_logps`), called on the DPO trainer's tokenization in the same loop, since those
experimental trainers tokenize by their own older rules.
All pairs form one batch (the step's loss is then the mean over every pair, whatever the order),
20 steps of AdamW at a constant learning rate, no weight decay, no clipping, no dropout.
"""
import json
import os
import shutil
import tempfile
import types

import peft
import torch
import transformers
import trl
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer



class TorchLogProbs:
    """TRL's fused LM head (`trl/kernels/chunked_logprob.py`) is a Triton kernel, which needs a GPU;
    on the CPU the same quantities in torch: the targets' log-probabilities, entropy, log Σ p²,
    mean logit and whether the target is the top-1 (logits scaled, soft-capped, over temperature)."""

    @staticmethod
    def apply(hidden, weight, bias, labels, temperature, chunk, softcap, logit_scale, outputs):
        z = hidden @ weight.T
        if bias is not None:
            z = z + bias
        z = z.float() * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        z = z / temperature
        lp = torch.log_softmax(z, -1)
        per = lp.gather(-1, labels[:, None]).squeeze(-1)
        entropy = -(lp.exp() * lp).sum(-1)
        return (per, entropy.detach(), torch.logsumexp(2 * lp, -1).detach(), z.mean(-1).detach(),
                z.argmax(-1) == labels)


trl.trainer.utils._ChunkedLogProbFunction = TorchLogProbs

FIX = "tests/fixtures"
OUT = f"{FIX}/preference"
TEMPLATE = os.environ.get(
    "LLAMA31_TEMPLATE",
    "/tmp/k/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja")
STEPS, LR = 20, 5e-3

os.makedirs(f"{OUT}/model", exist_ok=True)
for f in ["config.json", "model.safetensors", "tokenizer.json", "generation_config.json"]:
    shutil.copy(f"{FIX}/llama_tiny_a/{f}", f"{OUT}/model/{f}")
json.dump({
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|eot_id|>",
    "pad_token": "<|pad|>",
    "chat_template": open(TEMPLATE).read(),
}, open(f"{OUT}/model/tokenizer_config.json", "w"), indent=1)

torch.manual_seed(0)
base = LlamaForCausalLM.from_pretrained(f"{OUT}/model", dtype=torch.float32)
lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
shutil.rmtree(f"{OUT}/adapter", ignore_errors=True)
get_peft_model(base, lora).save_pretrained(f"{OUT}/adapter")
os.remove(f"{OUT}/adapter/README.md")

TEXT = [
    {"prompt": "The sky is", "chosen": " blue today.", "rejected": " made of green cheese."},
    {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5, said nobody"},
    {"prompt": "Name a fruit:", "chosen": " apple", "rejected": " a brick"},
    {"prompt": "Water boils at", "chosen": " 100 degrees Celsius at sea level.", "rejected": " 12 degrees."},
]
IMPLICIT = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in TEXT]
CHAT = [
    {"prompt": [{"role": "user", "content": r["prompt"]}],
     "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
     "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]}
    for r in TEXT
]
for name, rows in [("text", TEXT), ("implicit", IMPLICIT), ("chat", CHAT)]:
    with open(f"{OUT}/{name}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")

tok = AutoTokenizer.from_pretrained(f"{OUT}/model")


def policy():
    return PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(f"{OUT}/model", dtype=torch.float32), f"{OUT}/adapter", is_trainable=True)


def lora_grads(model):
    return {n.replace(".default", ""): p.grad.detach().clone().tolist()
            for n, p in model.named_parameters() if "lora_B" in n and p.grad is not None}


class Capture(TrainerCallback):
    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.grads = lora_grads(self.model)


def config(tmp, **kw):
    return DPOConfig(output_dir=tmp, per_device_train_batch_size=len(TEXT), max_steps=STEPS, learning_rate=LR,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
                     logging_steps=1, report_to=[], use_cpu=True, seed=0, max_length=192, save_strategy="no",
                     bf16=False, **kw)


METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected"]


def dpo_case(rows, **kw):
    model = policy()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = DPOTrainer(model=model, args=config(tmp, **kw), train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
        capture = Capture(model)
        trainer.add_callback(capture)
        tokenized = [{k: ex[k] for k in ["prompt_ids", "chosen_ids", "rejected_ids"]} for ex in trainer.train_dataset]
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == STEPS
    return {"pairs": tokenized, "loss": [h["loss"] for h in logs],
            "metrics": [{m: h[m] for m in METRICS} for h in logs], "grads": capture.grads}


KTO_METRICS = ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]


def kto_case(rows):
    """KTO on the text pairs, unpaired by TRL (the chosen completions desirable, then the rejected):
    eight examples, one batch, so the KL sequences rotate over all of them."""
    model = policy()
    with tempfile.TemporaryDirectory() as tmp:
        args = KTOConfig(output_dir=tmp, per_device_train_batch_size=2 * len(rows), max_steps=STEPS,
                         learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                         max_grad_norm=0.0, logging_steps=1, report_to=[], use_cpu=True, seed=0, max_length=192,
                         save_strategy="no", bf16=False, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
        trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        capture = Capture(model)
        trainer.add_callback(capture)
        tokenized = [{k: ex[k] for k in ["prompt_ids", "completion_ids", "KL_completion_ids", "label"]}
                     for ex in trainer.train_dataset]
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == STEPS
    return {"examples": tokenized, "loss": [h["loss"] for h in logs],
            "metrics": [{m: h[m] for m in KTO_METRICS} for h in logs], "grads": capture.grads}


def own_loop_case(pairs, loss_fn):
    """SimPO / ORPO: TRL's loss functions in a plain AdamW loop over the DPO tokenization."""
    model = policy()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    seqs = [p["prompt_ids"] + p[side] for side in ["chosen_ids", "rejected_ids"] for p in pairs]
    masks = [[-100] * len(p["prompt_ids"]) + p[side] for side in ["chosen_ids", "rejected_ids"] for p in pairs]
    n = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (n - len(s)) for s in seqs])
    labels = torch.tensor([m + [-100] * (n - len(m)) for m in masks])
    attn = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    losses, metrics, grads = [], [], None
    for step in range(STEPS):
        opt.zero_grad()
        logits = model(input_ids=ids, attention_mask=attn).logits
        loss, m = loss_fn(logits, labels)
        loss.backward()
        if step == 0:
            grads = lora_grads(model)
        opt.step()
        losses.append(loss.item())
        metrics.append(m)
    return {"loss": losses, "metrics": metrics, "grads": grads}


def simpo(beta, gamma):
    fake = types.SimpleNamespace(beta=beta, simpo_gamma=gamma, label_smoothing=0.0, loss_type="simpo", alpha=0.0,
                                 accelerator=types.SimpleNamespace(device="cpu"))

    def loss_fn(logits, labels):
        logps = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
        c, r = logps.chunk(2)
        losses, cr, rr = CPOTrainer.cpo_loss(fake, c, r)
        return losses.mean(), metrics_of(cr, rr, c, r)
    return loss_fn


def orpo(lam):
    fake = types.SimpleNamespace(beta=lam, accelerator=types.SimpleNamespace(device="cpu"))

    def loss_fn(logits, labels):
        logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
        c, r = logps.chunk(2)
        half = labels.shape[0] // 2
        # ORPO's NLL: the chosen completions' cross-entropy, per token (concatenated_forward).
        nll = torch.nn.functional.cross_entropy(
            logits[:half, :-1].reshape(-1, logits.shape[-1]), labels[:half, 1:].reshape(-1), ignore_index=-100)
        losses, cr, rr, _, _ = ORPOTrainer.odds_ratio_loss(fake, c, r)
        m = metrics_of(cr, rr, c, r)
        m["nll_loss"] = nll.item()
        return nll - losses.mean(), m
    return loss_fn


def metrics_of(cr, rr, c, r):
    return {"rewards/chosen": cr.mean().item(), "rewards/rejected": rr.mean().item(),
            "rewards/accuracies": (cr > rr).float().mean().item(), "rewards/margins": (cr - rr).mean().item(),
            "logps/chosen": c.mean().item(), "logps/rejected": r.mean().item()}


golden = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                       "peft": peft.__version__, "trl": trl.__version__},
          "steps": STEPS, "learning_rate": LR, "cases": {}}
cases = golden["cases"]
cases["dpo_sigmoid_text"] = dict(data="text", method="dpo", loss_type="sigmoid", beta=0.1,
                                 **dpo_case(TEXT, beta=0.1, loss_type=["sigmoid"]))
cases["dpo_ipo_text"] = dict(data="text", method="dpo", loss_type="ipo", beta=0.1,
                             **dpo_case(TEXT, beta=0.1, loss_type=["ipo"]))
cases["dpo_hinge_text"] = dict(data="text", method="dpo", loss_type="hinge", beta=0.1,
                               **dpo_case(TEXT, beta=0.1, loss_type=["hinge"]))
cases["dpo_sigmoid_implicit"] = dict(data="implicit", method="dpo", loss_type="sigmoid", beta=0.1,
                                     **dpo_case(IMPLICIT, beta=0.1, loss_type=["sigmoid"]))
cases["dpo_sigmoid_chat"] = dict(data="chat", method="dpo", loss_type="sigmoid", beta=0.1,
                                 **dpo_case(CHAT, beta=0.1, loss_type=["sigmoid"]))
pairs = cases["dpo_sigmoid_text"]["pairs"]
cases["simpo_text"] = dict(data="text", method="simpo", beta=2.0, simpo_gamma=0.5, pairs=pairs,
                           **own_loop_case(pairs, simpo(2.0, 0.5)))
cases["kto_text"] = dict(data="text", method="kto", beta=0.1, micro_batch=8, **kto_case(TEXT))
cases["orpo_text"] = dict(data="text", method="orpo", beta=0.1, pairs=pairs, **own_loop_case(pairs, orpo(0.1)))
with open(f"{OUT}/golden.json", "w") as f:
    json.dump(golden, f)
for name, c in cases.items():
    print(name, [round(x, 5) for x in c["loss"][:3]], "...", round(c["loss"][-1], 5))
