"""Reference token ids and chat rendering of Qwen2.5-Coder-0.5B-Instruct's GGUF tokenizer, as
transformers builds it: tests/fixtures/qwen2.5-coder/tokenizer-ref.json (read by
tests/qwen2_tokenizer.rs).

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.15.0 transformers==5.24.0 gguf
    models/fetch-qwen2.5-coder.sh
    /tmp/refenv/bin/python models/reference/make_qwen_tokenizer_refs.py [GGUF]

GGUF defaults to models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf. The tokenizer is
`AutoTokenizer.from_pretrained(folder, gguf_file=name)`; no model weights are loaded. Recorded:

- `ppl`: `tokenizer(text)["input_ids"][:256]` of tests/fixtures/ppl-text.txt (no BOS: Qwen's file
  says `tokenizer.ggml.add_bos_token` = false);
- `cases`: per tricky string, `tokenizer(s)["input_ids"]` and `tokenizer.decode(ids)`, with and
  without `skip_special_tokens`;
- `nfc`: one decomposed string, where transformers' GGUF tokenizer (no normalizer) and Qwen's own
  tokenizer.json (NFC normalizer, as `Qwen2Tokenizer` sets it) part: both id lists are kept;
- `chat`: `apply_chat_template(messages, tokenize=False, add_generation_prompt=True)` and the ids
  of that text (`add_special_tokens=False`, as `apply_chat_template(tokenize=True)` does).
"""
import json
import os
import re
import sys
import unicodedata

import tokenizers
import transformers
from tokenizers import normalizers
from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "../..")
gguf = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"))
out = os.path.join(ROOT, "tests/fixtures/qwen2.5-coder/tokenizer-ref.json")

tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))

CASES = [
    "I'm sure they'll say it's what we'd've done. DON'T, YOU'RE, She'S, I'LL",
    "12345 and 3.14159, 1,000,000 or 2024-12-01",
    "你好，世界！这是一个测试。日本語のテキストも。",
    "emoji 🤗🚀 family 👨\u200d👩\u200d👧 flag 🇫🇷 done",
    "line one\n\nline two\r\n   indented\n\t\ttabbed  \n\n\n   ",
    "def f(x):\n\tif x:\n\t\treturn x  *  2\n\treturn None\n",
    "Hello<|im_start|>user\nhi<|im_end|>\n<|endoftext|>tail",
    "<|fim_prefix|>def add(a, b):\n    <|fim_suffix|>\n<|fim_middle|>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "   leading and trailing   ",
    "naïve café résumé Ünïcödé Ελληνικά и русский",
    "x=1;y=2 # comment\nif (a&&b||!c) { return -1; } // 0x1F",
    "[PAD151665] <|im_start <|IM_START|> <|im_start|><|im_end|>",
]
for s in CASES:
    assert unicodedata.normalize("NFC", s) == s, f"{s!r}: the cases are NFC, where NFC does not matter"

def case(s):
    ids = tok(s)["input_ids"]
    return {"text": s, "ids": ids, "decoded": tok.decode(ids), "decoded_skip_special": tok.decode(ids, skip_special_tokens=True)}

text = open(os.path.join(ROOT, "tests/fixtures/ppl-text.txt"), encoding="utf-8").read()

decomposed = "cafe\u0301 n\u0303 A\u030a"
nfc_ids = tok(unicodedata.normalize("NFC", decomposed))["input_ids"]
backend = tokenizers.Tokenizer.from_str(tok.backend_tokenizer.to_str())
backend.normalizer = normalizers.NFC()
assert backend.encode(decomposed).ids == nfc_ids

messages = [{"role": "user", "content": "What is the capital of France?"}]
rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
assert "You are Qwen, created by Alibaba Cloud." in rendered
multi = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Write `add` in Rust."},
]
rendered_multi = tok.apply_chat_template(multi, tokenize=False, add_generation_prompt=True)

ref = {
    "source": "transformers AutoTokenizer.from_pretrained(gguf_file=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf); "
    "made by models/reference/make_qwen_tokenizer_refs.py",
    "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
    "vocab_size": len(tok),
    "special": {"bos": tok.bos_token, "eos": tok.eos_token, "pad": tok.pad_token, "add_bos_token": tok.add_bos_token},
    "ppl": {"file": "tests/fixtures/ppl-text.txt", "ids": tok(text)["input_ids"][:256]},
    "cases": [case(s) for s in CASES],
    "nfc": {"text": decomposed, "ids_transformers_gguf": tok(decomposed)["input_ids"], "ids_qwen_tokenizer_json": nfc_ids},
    "chat": [
        {"messages": m, "add_generation_prompt": True, "text": r, "ids": tok(r, add_special_tokens=False)["input_ids"]}
        for m, r in [(messages, rendered), (multi, rendered_multi)]
    ],
}
os.makedirs(os.path.dirname(out), exist_ok=True)
with open(out, "w", encoding="utf-8") as f:
    # Each id list on one line keeps the fixture small and its diffs readable.
    doc = json.dumps(ref, ensure_ascii=False, indent=1)
    doc = re.sub(r"\[\s*(\d+(?:,\s*\d+)*)\s*\]", lambda m: "[" + re.sub(r",\s*", ", ", m.group(1)) + "]", doc)
    f.write(doc + "\n")
print(out, os.path.getsize(out), "bytes")
