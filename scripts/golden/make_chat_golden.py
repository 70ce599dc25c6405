"""Golden chat-template renderings and token ids from transformers' apply_chat_template.

Writes tests/fixtures/chat_golden.json: for each real tokenizer (Phi-3 mini, Qwen 2.5 instruct,
Llama 3 instruct, Phi-4, and Qwen 3: Qwen 2.5's vocabulary with Qwen3-0.6B's template) and each multi-turn conversation of the shipped samples
(tests/fixtures/data/fastchat_sample.json: ShareGPT human/gpt; glaive_toolcall_sample.json:
with function_call/observation turns and a `tools` list), the rendered text and the token ids,
without and with `add_generation_prompt` (on the conversation minus its last assistant turn).
Phi-4's tokenizer.json is not in ../shared/data (over the size limit), so for Phi-4 only the
rendered text is recorded; so too for Gemma 2's, Phi-3.5-mini's and Mistral Nemo's templates
(llama.cpp's copies in tests/fixtures/templates/), with the errors they raise where they refuse a
conversation. `reasoning`: Qwen 3's renders of multi-turn conversations with reasoning, per
assistant turn.

Reference versions: transformers 5.17.0, tokenizers 0.23.3, jinja2 3.1.6.
Run from the repo root:  $KILN_REFPY scripts/golden/make_chat_golden.py
"""

import gzip
import json
import os
import shutil
import tempfile

import transformers
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

FIX = "tests/fixtures"
SHARED = "../shared/data/tokenizers"

# ShareGPT roles as kiln maps them by default (src/data/formats.rs).
ROLES = {"human": "user", "gpt": "assistant", "system": "system",
         "function_call": "assistant", "observation": "tool"}


def conversations():
    out = []
    fastchat = json.load(open(f"{FIX}/data/fastchat_sample.json"))
    for i in range(6):  # 4, 2, 6, 4, 2, 6 messages
        msgs = [{"role": ROLES[m["from"]], "content": m["value"]} for m in fastchat[i]["conversations"]]
        out.append({"source": "fastchat_sample.json", "row": i, "tools": None, "messages": msgs})
    # One with a system message in front.
    sys_msgs = [{"role": "system", "content": "You are a terse assistant. Answer in one sentence."}]
    sys_msgs += out[2]["messages"]
    out.append({"source": "fastchat_sample.json", "row": 2, "system": sys_msgs[0]["content"],
                "tools": None, "messages": sys_msgs})
    glaive = json.load(open(f"{FIX}/data/glaive_toolcall_sample.json"))
    for i in (0, 3):
        msgs = [{"role": ROLES[m["from"]], "content": m["value"]} for m in glaive[i]["conversations"]]
        tools = json.loads(glaive[i]["tools"]) or None
        out.append({"source": "glaive_toolcall_sample.json", "row": i, "tools": tools, "messages": msgs})
    return out


# Multi-turn conversations with reasoning: in a `reasoning_content` key (as Qwen 3's template and
# transformers' chat pipelines carry it) and inline in the content (`<think>...</think>`).
REASONING = [
    [{"role": "user", "content": "What is 17 + 25?"},
     {"role": "assistant", "content": "42.", "reasoning_content": "17 + 20 = 37, and 37 + 5 = 42."},
     {"role": "user", "content": "And twice that?"},
     {"role": "assistant", "content": "84.", "reasoning_content": "42 × 2 = 84."}],
    [{"role": "system", "content": "Think before you answer."},
     {"role": "user", "content": "Name a prime above 10."},
     {"role": "assistant", "content": "<think>\n11 has no divisors but 1 and itself.\n</think>\n\n11 is prime."},
     {"role": "user", "content": "One above 20?"},
     {"role": "assistant", "content": "<think>\n21 = 3·7 and 22 is even; 23 is prime.\n</think>\n\n23."},
     {"role": "user", "content": "Thanks!"},
     {"role": "assistant", "content": "You're welcome."}],
]


def reasoning_golden():
    """Qwen 3's template on the reasoning conversations: for each assistant turn k, the render of
    the messages up to k (what kiln trains on for that turn), its ids, and the render of the
    messages before k with the generation prompt (what the model is given when it generates
    turn k): the turn as generated is the first minus the second."""
    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir("qwen3", tmp))
        out = []
        for ci, msgs in enumerate(REASONING):
            turns = []
            for k, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                text = tok.apply_chat_template(msgs[:k + 1], tokenize=False)
                prompt = tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True)
                assert text.startswith(prompt)
                ids = tok(text, add_special_tokens=False)["input_ids"]
                turns.append({"turn": k, "text": text, "ids": ids, "prompt": prompt})
            out.append({"messages": msgs, "qwen3": turns})
        return out


def tokenizer_dir(name, tmp):
    if name == "qwen3":
        # Qwen 3 shares Qwen 2.5's vocabulary; its template is llama.cpp's copy of Qwen3-0.6B's
        # (tests/fixtures/templates/), read from chat_template.jinja as transformers 5 reads it.
        d = tokenizer_dir("qwen2.5", os.path.join(tmp, "q3"))
        shutil.copy(f"{FIX}/templates/Qwen-Qwen3-0.6B.jinja", os.path.join(d, "chat_template.jinja"))
        return d
    d = os.path.join(tmp, name)
    os.makedirs(d)
    src = {"phi3": f"{SHARED}/phi3", "qwen2.5": f"{SHARED}/qwen2.5", "llama3-instruct": f"{SHARED}/llama3"}[name]
    shutil.copy(f"{FIX}/tokenizers/{name}/tokenizer_config.json", d)
    if os.path.exists(f"{src}/tokenizer.json"):
        shutil.copy(f"{src}/tokenizer.json", d)
    else:
        with gzip.open(f"{src}/tokenizer.json.gz", "rb") as f, open(f"{d}/tokenizer.json", "wb") as g:
            g.write(f.read())
    for extra in ("vocab.json", "merges.txt"):
        if os.path.exists(f"{src}/{extra}"):
            shutil.copy(f"{src}/{extra}", d)
    return d


def main():
    convs = conversations()
    golden = {"versions": {"transformers": transformers.__version__}, "conversations": convs, "renders": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("phi3", "qwen2.5", "llama3-instruct", "qwen3"):
            tok = AutoTokenizer.from_pretrained(tokenizer_dir(name, tmp))
            cases = []
            for ci, c in enumerate(convs):
                for gen in (False, True):
                    msgs = c["messages"][:-1] if gen else c["messages"]
                    text = tok.apply_chat_template(msgs, tools=c["tools"], tokenize=False, add_generation_prompt=gen)
                    ids = tok.apply_chat_template(msgs, tools=c["tools"], tokenize=True, return_dict=False,
                                                  add_generation_prompt=gen)
                    assert ids == tok(text, add_special_tokens=False)["input_ids"]
                    cases.append({"conversation": ci, "add_generation_prompt": gen, "text": text, "ids": ids})
            golden["renders"][name] = cases
            print(name, type(tok).__name__, len(cases))
    # Phi-4: render only (no tokenizer.json available).
    cfg = json.load(open(f"{FIX}/tokenizers/phi4/tokenizer_config.json"))
    specials = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if cfg.get(k)}
    cases = []
    for ci, c in enumerate(convs):
        for gen in (False, True):
            msgs = c["messages"][:-1] if gen else c["messages"]
            text = render_jinja_template([msgs], tools=c["tools"], chat_template=cfg["chat_template"],
                                         add_generation_prompt=gen, **specials)[0][0]
            cases.append({"conversation": ci, "add_generation_prompt": gen, "text": text, "ids": None})
    golden["renders"]["phi4"] = cases
    # Templates rendered without a tokenizer (none in shared/data), from llama.cpp's copies in
    # tests/fixtures/templates/: Gemma 2's instruct template, Phi-3.5-mini-instruct's and Mistral
    # Nemo Instruct's. Gemma 2 and Nemo refuse what they cannot render (a system message for
    # Gemma, roles that do not alternate, tool turns without ids); those cases record the error
    # transformers raises.
    for key, file, specials in [
            ("gemma2-it", "google-gemma-2-2b-it.jinja", {"bos_token": "<bos>", "eos_token": "<eos>"}),
            ("phi3.5", "microsoft-Phi-3.5-mini-instruct.jinja", {"bos_token": "<s>", "eos_token": "<|endoftext|>"}),
            ("mistral-nemo", "mistralai-Mistral-Nemo-Instruct-2407.jinja", {"bos_token": "<s>", "eos_token": "</s>"})]:
        template = open(f"{FIX}/templates/{file}").read()
        cases = []
        for ci, c in enumerate(convs):
            for gen in (False, True):
                msgs = c["messages"][:-1] if gen else c["messages"]
                case = {"conversation": ci, "add_generation_prompt": gen, "ids": None, "template": file,
                        "specials": specials}
                try:
                    case["text"] = render_jinja_template([msgs], tools=c["tools"], chat_template=template,
                                                         add_generation_prompt=gen, **specials)[0][0]
                except Exception as e:  # jinja2's TemplateError from raise_exception
                    case["error"] = str(e)
                cases.append(case)
        golden["renders"][key] = cases
    golden["reasoning"] = reasoning_golden()
    with open(f"{FIX}/chat_golden.json", "w") as f:
        json.dump(golden, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
