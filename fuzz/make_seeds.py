#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/) from the repository's own
fixtures, with the standard library only. Deterministic: run again, get the same files."""
import json, os, struct, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "corpus")


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def safetensors(tensors, metadata=None):
    """tensors: [(name, dtype, shape, bytes)] -> safetensors file bytes."""
    header, data = {}, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def f32(values):
    return struct.pack("<%df" % len(values), *values)


# --- GGUF (v3) writer ---
def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gval(v):
    if isinstance(v, bool):
        return struct.pack("<I", 7) + struct.pack("<B", v)
    if isinstance(v, int):
        return struct.pack("<I", 4) + struct.pack("<I", v)
    if isinstance(v, float):
        return struct.pack("<I", 6) + struct.pack("<f", v)
    if isinstance(v, str):
        return struct.pack("<I", 8) + gstr(v)
    if isinstance(v, list):
        if all(isinstance(x, str) for x in v):
            return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(gstr(x) for x in v)
        return struct.pack("<IIQ", 9, 5, len(v)) + b"".join(struct.pack("<i", x) for x in v)
    raise TypeError(v)


def gguf(metadata, tensors, alignment=32):
    """tensors: [(name, dims (GGUF order, fastest first), f32 values)]."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for k, v in metadata:
        out += gstr(k) + gval(v)
    offset, blobs = 0, []
    for name, dims, values in tensors:
        out += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", 0, offset)
        raw = f32(values)
        raw += b"\0" * (-len(raw) % alignment)
        blobs.append(raw)
        offset += len(raw)
    out += b"\0" * (-len(out) % alignment)
    return out + b"".join(blobs)


def micro_gguf():
    """A one-layer Llama GGUF (hidden 8) with tiny-llama's real vocabulary and merges."""
    tok = json.load(open(os.path.join(ROOT, "models/tiny-llama/tokenizer.json")))
    vocab = tok["model"]["vocab"]
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    types = [1] * len(tokens)
    for a in tok["added_tokens"]:
        types[a["id"]] = 3
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    h, ff, n = 8, 16, len(tokens)
    md = [
        ("general.architecture", "llama"),
        ("llama.block_count", 1),
        ("llama.context_length", 64),
        ("llama.embedding_length", h),
        ("llama.feed_forward_length", ff),
        ("llama.attention.head_count", 2),
        ("llama.attention.head_count_kv", 2),
        ("llama.rope.freq_base", 10000.0),
        ("llama.attention.layer_norm_rms_epsilon", 1e-5),
        ("tokenizer.ggml.model", "gpt2"),
        ("tokenizer.ggml.pre", "gpt2"),
        ("tokenizer.ggml.tokens", tokens),
        ("tokenizer.ggml.token_type", types),
        ("tokenizer.ggml.merges", merges),
        ("tokenizer.ggml.bos_token_id", 0),
        ("tokenizer.ggml.eos_token_id", 2),
        ("tokenizer.ggml.add_bos_token", True),
    ]
    v = lambda k: [((i * 7919) % 97 - 48) / 480.0 for i in range(k)]
    t = [
        ("token_embd.weight", [h, n], v(h * n)),
        ("output_norm.weight", [h], [1.0] * h),
        ("blk.0.attn_norm.weight", [h], [1.0] * h),
        ("blk.0.ffn_norm.weight", [h], [1.0] * h),
        ("blk.0.attn_q.weight", [h, h], v(h * h)),
        ("blk.0.attn_k.weight", [h, h], v(h * h)),
        ("blk.0.attn_v.weight", [h, h], v(h * h)),
        ("blk.0.attn_output.weight", [h, h], v(h * h)),
        ("blk.0.ffn_gate.weight", [h, ff], v(h * ff)),
        ("blk.0.ffn_up.weight", [h, ff], v(h * ff)),
        ("blk.0.ffn_down.weight", [ff, h], v(h * ff)),
    ]
    return gguf(md, t), gguf(md[:2] + [("general.alignment", 64)], [], alignment=64)


def main():
    # safetensors headers and shard indexes
    put("safetensors", "two-tensors", safetensors(
        [("model.norm.weight", "F32", [4], f32([1, 2, 3, 4])), ("lm_head.weight", "BF16", [2, 2], b"\x80?" * 4)],
        {"format": "pt"}))
    put("safetensors", "empty", safetensors([]))
    put("safetensors", "index.json", json.dumps({"metadata": {"total_size": 16}, "weight_map": {
        "model.norm.weight": "model-00001-of-00001.safetensors"}}))
    # config.json of every fixture architecture
    for m in sorted(os.listdir(os.path.join(ROOT, "models"))):
        p = os.path.join(ROOT, "models", m, "config.json")
        if m.startswith("tiny-") and os.path.isfile(p):
            put("config", m + ".json", open(p, "rb").read())
    # GGUF
    full, header_only = micro_gguf()
    put("gguf", "micro-llama.gguf", full)
    put("gguf", "header-only.gguf", header_only)
    put("gguf_tokenizer", "micro-llama.gguf", full)
    # quant_state JSON from the pre-quantized fixture
    st = open(os.path.join(ROOT, "tests/fixtures/tiny-llama-bnb-nf4/model.safetensors"), "rb").read()
    (n,) = struct.unpack("<Q", st[:8])
    header = json.loads(st[8:8 + n])
    seen = set()
    for name, info in sorted(header.items()):
        if ".quant_state." in name:
            a, b = info["data_offsets"]
            raw = st[8 + n + a:8 + n + b]
            if raw not in seen and len(seen) < 4:
                seen.add(raw)
                put("quant_state", "state-%d.json" % len(seen), raw)
    # chat templates
    for m in sorted(os.listdir(os.path.join(ROOT, "models"))):
        p = os.path.join(ROOT, "models", m, "chat_template.jinja")
        if os.path.isfile(p):
            put("chat_template", m + ".jinja", open(p, "rb").read())
    smol = os.path.join(ROOT, "models/smollm2-135m-instruct/tokenizer_config.json")
    if os.path.isfile(smol):
        put("chat_template", "smollm2.jinja", json.load(open(smol))["chat_template"])
    put("chat_template", "features.jinja",
        "{% macro line(m) %}<|{{ m.role }}|>{{ m.content | trim }}{% endmacro %}"
        "{%- for m in messages if m.role != 'x' %}{% if loop.first and m.role == 'system' %}{{ bos_token }}{% endif %}"
        "{{ line(m) }}{% set ns = namespace(n=loop.index) %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% else %}{{ eos_token }}{% endif %}"
        "{{ messages[-1]['content'].startswith('B') }}{{ raise_exception('x') if messages|length > 99 }}")
    # Hub answers: metadata of a config.json (what a HEAD and a GET both get), a redirect,
    # a 429, a 404 with the Hub's error header.
    cfg = b'{"model_type": "llama"}'
    put("hub_response", "ok", b"HTTP/1.1 200 OK\r\nX-Repo-Commit: " + b"a" * 40 + b"\r\nETag: \"abc\"\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(cfg) + cfg)
    put("hub_response", "redirect", b"HTTP/1.1 302 Found\r\nLocation: /org/model/resolve/main/config.json\r\n"
        b"Content-Length: 0\r\n\r\n")
    put("hub_response", "throttled", b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 0\r\nContent-Length: 2\r\n\r\n{}")
    put("hub_response", "missing", b"HTTP/1.1 404 Not Found\r\nX-Error-Code: EntryNotFound\r\n"
        b"X-Error-Message: Entry not found\r\nContent-Length: 0\r\n\r\n")
    # server requests
    put("serve_request", "chat.json", json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8, "temperature": 0.5, "top_p": 0.9, "stream": True, "stream_options": {"include_usage": True},
        "stop": ["\n"], "presence_penalty": 0.1, "seed": 3}))
    put("serve_request", "completion.json", json.dumps({"model": "m", "prompt": "Once", "max_tokens": 4,
        "frequency_penalty": 0.2, "ignore_eos": True, "n": 1}))
    put("serve_request", "parts.json", json.dumps({"model": "m", "messages": [{"role": "system", "content": [
        {"type": "text", "text": "be brief"}]}, {"role": "user", "content": "x"}], "logprobs": False}))
    # PEFT adapter configs: the two fixtures, and one with every pattern field
    for name in ("lora-qv", "lora-all-linear"):
        with open(os.path.join(ROOT, "tests", "fixtures", "lora", name, "adapter_config.json"), "rb") as f:
            put("adapter_config", name + ".json", f.read())
    put("adapter_config", "patterns.json", json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
        "target_modules": r".*\.(q|v)_proj", "exclude_modules": ["lm_head"], "rank_pattern": {r"layers\.1\..*": 2},
        "alpha_pattern": {"v_proj": 3}, "layers_to_transform": [0, 2], "layers_pattern": "layers", "use_rslora": True}))


if __name__ == "__main__":
    sys.exit(main())
