"""`nibble serve` through the official `openai` client (run by tests/openai_client.rs).

argv: the server's base URL, its API key, the model name, and the URL of a second server whose
queue holds nothing (every request there is refused with 429).
"""

import concurrent.futures
import json
import sys
import urllib.error
import urllib.request

import openai

base, key, model, full = sys.argv[1:5]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=300)


def check(name, cond, detail=""):
    if not cond:
        raise SystemExit(f"FAILED {name}: {detail}")
    print(f"ok {name}")


def chat(content, **kw):
    args = {"max_tokens": 24, "temperature": 0, **kw}
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **args)


def expect_error(name, kind, status, param, fn):
    try:
        fn()
    except kind as e:
        body = e.body if isinstance(e.body, dict) else {}
        # The client unwraps {"error": {...}} into body.
        got = body.get("param")
        check(name, e.status_code == status and (param is None or got == param), f"{e.status_code} {body}")
        check(name + " has an error object", {"message", "type", "param", "code"} <= set(body), str(body))
        return
    raise SystemExit(f"FAILED {name}: no error")


models = client.models.list()
check("models", [m.id for m in models.data] == [model], str(models))

answer = chat("What is the capital of France?")
text = answer.choices[0].message.content
check("chat", len(text) > 0 and answer.usage.completion_tokens > 0, str(answer))
check("chat finish_reason", answer.choices[0].finish_reason in ("stop", "length"))

pieces, usage = [], None
for chunk in chat("What is the capital of France?", stream=True, stream_options={"include_usage": True}):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage
check("stream equals the plain answer", "".join(pieces) == text, repr(("".join(pieces), text)))
check("stream usage", usage is not None and usage.completion_tokens == answer.usage.completion_tokens)

c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
check("completions", c.choices[0].text != "" and c.usage.completion_tokens == 8, str(c))

prompts = [f"Name a colour and the number {i}." for i in range(8)]
alone = [chat(p).choices[0].message.content for p in prompts]
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    together = list(pool.map(lambda p: chat(p).choices[0].message.content, prompts))
check("8 concurrent greedy requests answer as one by one", alone == together, repr((alone, together)))

expect_error("n=2", openai.BadRequestError, 400, "n", lambda: chat("x", n=2))
expect_error("logprobs", openai.BadRequestError, 400, "logprobs", lambda: chat("x", logprobs=True))
expect_error("temperature out of range", openai.BadRequestError, 400, "temperature", lambda: chat("x", temperature=5))
expect_error("context exceeded", openai.BadRequestError, 400, "messages", lambda: chat("x", max_tokens=100000))
expect_error(
    "unknown model", openai.NotFoundError, 404, "model",
    lambda: client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}]),
)
bad_key = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
expect_error("wrong key", openai.AuthenticationError, 401, None, lambda: bad_key.models.list())
expect_error("body too large", openai.APIStatusError, 413, None, lambda: chat("a" * (5 * 1024 * 1024)))
busy = openai.OpenAI(base_url=full + "/v1", api_key=key, max_retries=0)
expect_error(
    "full queue", openai.RateLimitError, 429, None,
    lambda: busy.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=4),
)


def get(url, auth=True):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if auth else {})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


status, body = get(base + "/health", auth=False)
check("health", status == 200 and json.loads(body)["status"] == "ok", body)
status, body = get(base + "/metrics")
check("metrics", status == 200 and "nibble_completion_tokens_total" in body and "nibble_batch_size_bucket" in body, body[:200])
print("all passed")
