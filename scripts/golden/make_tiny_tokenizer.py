"""Builds src/model/tiny_tokenizer.json, the byte-level BPE tokenizer of `kiln init-tiny` models.

    /tmp/tokenv/bin/python scripts/golden/make_tiny_tokenizer.py

A 512-entry vocabulary (256 bytes, merges learned on the shipped Alpaca subset, and Llama 3's
special tokens) with Llama 3's pre-tokenizer and BOS post-processor, so tiny models behave like
Llama 3 models at a size a test can train in seconds. Made with HF tokenizers 0.23.
"""
import json
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers, Regex

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|pad|>"]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

rows = [json.loads(l) for l in open("datasets/alpaca_tiny.jsonl")]
texts = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in rows]

tok = Tokenizer(models.BPE(ignore_merges=True))
tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
])
tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
trainer = trainers.BpeTrainer(vocab_size=512 - len(SPECIALS), show_progress=False,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
tok.train_from_iterator(texts, trainer)
tok.add_special_tokens(SPECIALS)
bos = SPECIALS[0]
tok.post_processor = processors.TemplateProcessing(
    single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
    special_tokens=[(bos, tok.token_to_id(bos))])
assert tok.get_vocab_size() == 512, tok.get_vocab_size()
tok.save("src/model/tiny_tokenizer.json")
print(tok.encode("Give three tips for staying healthy.").tokens)
