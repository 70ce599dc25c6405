"""Preference pairs from GSM8K, deterministic and offline (no download beyond ../shared/data):

    python3 scripts/bench/gsm8k_preference.py OUT_DIR [TRAIN_PAIRS] [TEST_PAIRS]

For each problem, the prompt is the question as a user message, `chosen` the reference solution as
the assistant's answer, and `rejected` the same solution with its final answer changed (the number
after `####` plus an offset of 1 to 9 taken from the row's index), so the two differ only where the
answer is stated. Calculator annotations (`<<48/2=24>>`) are removed from both. Writes
OUT_DIR/train.jsonl (the first TRAIN_PAIRS of GSM8K train, default 400) and OUT_DIR/test.jsonl (the
first TEST_PAIRS of GSM8K test, default 100), and OUT_DIR/questions.jsonl (the same test rows as
prompt/answer for `kiln eval --task exact-match`).
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


if __name__ == "__main__":
    main()
