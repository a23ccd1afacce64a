"""Aggregate completion tokens/s and time to first token of an OpenAI-compatible server at
several numbers of concurrent streams, with the official `openai` client.

usage: serve_bench.py BASE_URL MODEL [STREAMS...]   (default streams: 1 4 8 16)
Each stream asks for 96 greedy tokens with `ignore_eos` (nibble and llama-server both take it),
so every run produces the same number of tokens. Prints one JSON line per concurrency.
"""

import concurrent.futures
import json
import sys
import time

import openai

base, model = sys.argv[1], sys.argv[2]
levels = [int(a) for a in sys.argv[3:]] or [1, 4, 8, 16]
client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
TOKENS = 96


def one(i):
    t0 = time.perf_counter()
    first, n = None, 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Write a short story about a robot named Unit {i}."}],
        max_tokens=TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        if chunk.usage:
            n = chunk.usage.completion_tokens
    return first or 0.0, n


one(0)  # warm-up
for k in levels:
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(k) as pool:
        results = list(pool.map(one, range(k)))
    wall = time.perf_counter() - t0
    tokens = sum(n for _, n in results)
    ttft = sorted(f for f, _ in results)
    print(json.dumps({
        "streams": k,
        "completion_tokens": tokens,
        "seconds": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_median_s": round(ttft[len(ttft) // 2], 3),
        "ttft_max_s": round(ttft[-1], 3),
    }), flush=True)
