"""Token ids transformers gives around added tokens, on the real tokenizer files kiln ships as test
fixtures, for tests/tokenizer_added_tokens.rs.

transformers honours each added token's flags: `special` (false: a plain added word), `lstrip` and
`rstrip` (the token swallows the whitespace before / after it), `normalized` (matched on the
normalized text) and `single_word` (matched only as a whole word). The real files cover special
true/false (Qwen 2.5), rstrip (Phi-3) and normalized (GPT-2); lstrip and single_word appear in none,
so a GPT-2 variant adds tokens with every flag to tokenizer.json and tokenizer_config.json (EXTRA
below; the Rust test adds the same ones).

Texts: kiln's probe text (src/gguf/vocab_probe.rs), and for each added token (Llama 3's 256
reserved ones only the first 12 and the named ones) the token in every surrounding: between
words, between double spaces, between newlines, glued to words, at the start and at the end.
Ids are `tok(text, add_special_tokens=False)["input_ids"]`.

Reference versions: transformers 5.17.0, tokenizers 0.23.3.
Run from the repo root:  $KILN_REFPY scripts/golden/make_added_tokens_golden.py
Writes tests/fixtures/added_tokens_golden.json.
"""

import gzip
import json
import os
import re
import tempfile

import tokenizers
import transformers
from transformers import AutoTokenizer

FIX = "tests/fixtures"
NAMES = ("phi3", "qwen2.5", "llama3-instruct", "gpt2", "gpt2-flags")
# Added to GPT-2's tokenizer.json (ids after its vocabulary) for the flags no real file uses.
EXTRA = [
    {"content": "<lstrip>", "special": True, "lstrip": True, "rstrip": False, "normalized": False, "single_word": False},
    {"content": "<both>", "special": False, "lstrip": True, "rstrip": True, "normalized": False, "single_word": False},
    {"content": "word", "special": False, "lstrip": False, "rstrip": False, "normalized": False, "single_word": True},
    {"content": "Norm", "special": False, "lstrip": False, "rstrip": False, "normalized": True, "single_word": False},
    {"content": "[plain]", "special": False, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False},
]
SURROUNDINGS = ["a {} b", "a  {}  b", "a\n{}\nb", "a{}b", "{} start", "end {}", "x {}{} y", "words{} and {}words"]


def probe_text():
    src = open("src/gguf/vocab_probe.rs", encoding="utf-8").read()
    lit = src.split('pub const PROBE: &str = "', 1)[1].split('";\n', 1)[0]
    lit = re.sub(r"\\\n\s*", "", lit)
    return re.sub(r'\\([ntr"\\])', lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m[1], m[1]), lit)


def tokenizer_dir(name, tmp):
    src_name = "gpt2" if name == "gpt2-flags" else name
    d = os.path.join(tmp, name)
    os.makedirs(d)
    src = f"{FIX}/tokenizers/{src_name}"
    tc = json.load(open(f"{src}/tokenizer_config.json"))
    with gzip.open(f"{src}/tokenizer.json.gz", "rt", encoding="utf-8") as f:
        tj = json.load(f)
    if name == "gpt2-flags":
        # In both files, as save_pretrained writes them (transformers 5 builds GPT2Tokenizer from
        # the class and adds only the tokenizer_config's added_tokens_decoder).
        n = len(tj["model"]["vocab"])
        tj["added_tokens"] += [dict(t, id=n + i) for i, t in enumerate(EXTRA)]
        tc["added_tokens_decoder"].update({str(n + i): t for i, t in enumerate(EXTRA)})
    with open(f"{d}/tokenizer_config.json", "w") as g:
        json.dump(tc, g, ensure_ascii=False)
    with open(f"{d}/tokenizer.json", "w", encoding="utf-8") as g:
        json.dump(tj, g, ensure_ascii=False)
    return d, tj


def texts_for(tj):
    added = [a["content"] for a in tj["added_tokens"]]
    keep = [t for t in added if "reserved_special_token" not in t] + \
        [t for t in added if "reserved_special_token" in t][:12]
    return [probe_text()] + [s.format(t, t) if s.count("{}") == 2 else s.format(t)
                             for t in keep for s in SURROUNDINGS]


def main():
    golden = {"versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
              "extra": EXTRA, "tokenizers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in NAMES:
            d, tj = tokenizer_dir(name, tmp)
            tok = AutoTokenizer.from_pretrained(d)
            texts = texts_for(tj)
            golden["tokenizers"][name] = {
                "texts": texts,
                "ids": [tok(t, add_special_tokens=False)["input_ids"] for t in texts],
            }
            print(name, len(texts), "texts")
    with open(f"{FIX}/added_tokens_golden.json", "w") as f:
        json.dump(golden, f, ensure_ascii=False)


if __name__ == "__main__":
    main()
