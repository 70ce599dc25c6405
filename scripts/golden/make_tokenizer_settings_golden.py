"""Golden token ids for plain rows (text, prompt/completion) and conversations, from transformers,
on real tokenizer files, and proof that transformers ignores a tokenizer.json's `truncation` and
`padding` settings unless a call asks for them (kiln must too).

Writes tests/fixtures/tokenizer_settings_golden.json: for each tokenizer (Phi-3 mini, Qwen 2.5
instruct, Llama 3 instruct, GPT-2 as re-saved with `"truncation": {"max_length": 50}`) and the 16
GSM8K rows of tests/fixtures/data/gsm8k_sample.jsonl:
  - text rows `question + "\n" + answer`: `tok(text)["input_ids"] + [eos]` (TRL's SFT on text:
    the tokenizer's own special tokens, EOS appended);
  - prompt/completion rows: `tok(question)` and `tok(answer, add_special_tokens=False)`;
  - conversations (tokenizers with a chat template): `apply_chat_template(..., tokenize=True)` of
    the first 6 FastChat rows.
Each is computed with the file as shipped and with the file edited to set truncation
(max_length 50), padding (Fixed 64), and both; the script asserts the ids are the same in all four.

Reference versions: transformers 5.17.0, tokenizers 0.23.3.
Run from the repo root:  $KILN_REFPY scripts/golden/make_tokenizer_settings_golden.py
"""

import gzip
import json
import os
import tempfile

import tokenizers
import transformers
from transformers import AutoTokenizer

FIX = "tests/fixtures"
NAMES = ("phi3", "qwen2.5", "llama3-instruct", "gpt2")
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}

# The edits the Rust test makes too (tests/tokenizer_settings.rs).
TRUNCATION = {"direction": "Right", "max_length": 50, "strategy": "LongestFirst", "stride": 0}
PADDING = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None,
           "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"}
VARIANTS = {"as_shipped": {}, "truncation": {"truncation": TRUNCATION}, "padding": {"padding": PADDING},
            "both": {"truncation": TRUNCATION, "padding": PADDING}}


def tokenizer_dir(name, variant, tmp):
    d = os.path.join(tmp, f"{name}-{variant}")
    os.makedirs(d)
    src = f"{FIX}/tokenizers/{name}"
    with open(f"{src}/tokenizer_config.json") as f, open(f"{d}/tokenizer_config.json", "w") as g:
        g.write(f.read())
    with gzip.open(f"{src}/tokenizer.json.gz", "rt", encoding="utf-8") as f:
        tj = json.load(f)
    tj.update(VARIANTS[variant])
    with open(f"{d}/tokenizer.json", "w", encoding="utf-8") as g:
        json.dump(tj, g, ensure_ascii=False)
    return d


def rows():
    return [json.loads(l) for l in open(f"{FIX}/data/gsm8k_sample.jsonl")]


def conversations():
    fastchat = json.load(open(f"{FIX}/data/fastchat_sample.json"))
    return [[{"role": ROLES[m["from"]], "content": m["value"]} for m in fastchat[i]["conversations"]]
            for i in range(6)]


def ids_of(tok):
    eos = tok.eos_token_id
    text = []
    for r in rows():
        ids = tok(r["question"] + "\n" + r["answer"])["input_ids"]
        text.append(ids if ids and ids[-1] == eos else ids + [eos])
    prompted = [{"prompt": tok(r["question"])["input_ids"],
                 "completion": tok(r["answer"], add_special_tokens=False)["input_ids"]} for r in rows()]
    chat = None
    if tok.chat_template:
        chat = [tok.apply_chat_template(m, tokenize=True, return_dict=False) for m in conversations()]
    return {"eos": eos, "text": text, "prompt_completion": prompted, "chat": chat}


def main():
    golden = {"versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
              "truncation": TRUNCATION, "padding": PADDING, "tokenizers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in NAMES:
            results = {v: ids_of(AutoTokenizer.from_pretrained(tokenizer_dir(name, v, tmp))) for v in VARIANTS}
            for v, r in results.items():
                assert r == results["as_shipped"], f"{name}: transformers honours {v}"
            g = results["as_shipped"]
            golden["tokenizers"][name] = g
            n_text = sum(map(len, g["text"]))
            print(name, "text tokens", n_text, "chat tokens", g["chat"] and sum(map(len, g["chat"])))
    with open(f"{FIX}/tokenizer_settings_golden.json", "w") as f:
        json.dump(golden, f)


if __name__ == "__main__":
    main()
