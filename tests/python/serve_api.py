#!/usr/bin/env python3
"""dsopen-serve driven by the real `openai` client (and raw HTTP where the client would not send it).

Two small models are trained for a few steps on fortunes: a Llama-style model with grouped-query attention and a
DeepSeek-V3-style model (MLA, MoE). For each, a server is started on a free loopback port and:
  - greedy completions equal dsopen-generate's tokens for 16 prompts of different lengths, sent one at a time and
    all 16 at once (continuous batching never changes results);
  - chat completions equal dsopen-generate --chat; streamed deltas add up to the whole reply; usage and
    finish_reason are right; stop strings end the text before them; n choices with a seed are reproducible;
    logprobs are the model's (the greedy token is the most likely one);
  - errors come in OpenAI's error object with the right status: unknown model 404, wrong types and ranges 400,
    a prompt or max_tokens past the context 400, a wrong API key 401, a body over the limit 413, malformed JSON
    and invalid UTF-8 400, a full queue 429; a client that disconnects cancels its request (/metrics counts it),
    streaming or not; a non-streaming request cut off by a shutdown fails as a transfer;
  - LoRA adapters written by peft, served over the base (--adapter NAME=DIR) and chosen per request, give the
    text dsopen-generate --adapter gives, when requests on different adapters run in one batch;
  - SIGTERM lets a running stream finish and the server exits 0.

Usage: serve_api.py BIN_DIR
"""
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
from harness import Harness

H = Harness(sys.argv[1], "dsopen-serve-")
W, b, run, must, check = H.work, H.b, H.run, H.must, H.check
KEY = "test-key"

MODELS = {
    "llama": "{flavor: tiny-dense, vocab_size: 640, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
             "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256}",
    "v3": "{flavor: debug, vocab_size: 600, max_position_embeddings: 256}",
}


class Server:
    """dsopen-serve on a free port; the port comes from its first line of output."""

    def __init__(self, model, *extra):
        self.proc = subprocess.Popen([b("serve"), "--model", model, "--port", "0", "--api-key", KEY,
                                      "--served-model-name", "m", "--threads", "1", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on"):
            sys.exit(f"dsopen-serve did not start: {line}{self.proc.stderr.read()}")
        self.port = int(line.rsplit(":", 1)[1])
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=KEY, max_retries=0)

    def raw(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        h.update(headers or {})
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, data

    def metrics(self):
        _, data = self.raw("GET", "/metrics")
        out = {}
        for line in data.decode().splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def generate(model, prompt, n, chat=False):
    args = [b("generate"), "--model", model, "--prompt", prompt, "--max-new-tokens", str(n), "--temperature", "0",
            "--repetition-penalty", "1", "--json", "--threads", "1"]
    out = json.loads(must(args + (["--chat"] if chat else [])))
    return out["texts"][0], len(out["tokens"][0])


def error_of(fn):
    try:
        fn()
    except openai.APIStatusError as e:
        return e.status_code, e.body if isinstance(e.body, dict) else {}
    return None, {}


PROMPTS = ["A", "Life is", "The best way to", "You will", "Never trust a", "It is a truth universally acknowledged",
           "Q: What", "Be", "Do not", "Fortune favors", "The", "If you can read this", "Why", "Money", "Today is a",
           "Where there is smoke"]


def test_model(name, model):
    s = Server(model, "--max-num-seqs", "16")
    c = s.client
    check([m.id for m in c.models.list().data] == ["m"], f"{name}: /v1/models lists the served name")

    expected = [generate(model, p, 24) for p in PROMPTS]

    def complete(p):
        r = c.completions.create(model="m", prompt=p, max_tokens=24, temperature=0)
        return r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason

    alone = [complete(p) for p in PROMPTS]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(complete, PROMPTS))
    check([(t, n) for t, n, _ in alone] == expected, f"{name}: greedy completions sent one at a time equal dsopen-generate")
    check([(t, n) for t, n, _ in together] == expected,
          f"{name}: greedy completions sent 16 at once equal dsopen-generate (continuous batching)")
    check(all(f == ("length" if n == 24 else "stop") for _, n, f in alone), f"{name}: finish_reason length / stop")

    # Chat: the model's chat template, as dsopen-generate --chat renders it.
    want, want_n = generate(model, "Tell me a joke", 20, chat=True)
    r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Tell me a joke"}], max_tokens=20,
                                  temperature=0)
    check(r.choices[0].message.content == want and r.choices[0].message.role == "assistant",
          f"{name}: chat reply equals dsopen-generate --chat")
    prompt_tokens = r.usage.prompt_tokens
    check(r.usage.completion_tokens == want_n and r.usage.total_tokens == prompt_tokens + want_n,
          f"{name}: chat usage counts prompt and completion tokens")
    chunks = list(c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Tell me a joke"}],
                                            max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    check(text == want, f"{name}: streamed chat deltas add up to the reply")
    check(finishes == [r.choices[0].finish_reason], f"{name}: one finish_reason, on the last chunk")
    check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == want_n and not chunks[-1].choices,
          f"{name}: stream_options.include_usage ends with the usage")

    # Stop strings: the text ends before the first one.
    full = alone[1][0]
    if len(full) > 6:
        stop = full[3:6]
        r = c.completions.create(model="m", prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=[stop])
        check(r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop",
              f"{name}: a stop string ends the text before it")

    # n choices with a seed: reproducible, and the choices differ from each other.
    def sampled(seed):
        r = c.completions.create(model="m", prompt="The", max_tokens=16, temperature=1.0, n=3, seed=seed)
        return [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]

    a, a2, other = sampled(7), sampled(7), sampled(8)
    check(len(a) == 3 and a == a2, f"{name}: n=3 with a seed gives the same choices again")
    check(len(set(a)) > 1 and a != other, f"{name}: the choices and other seeds differ")

    # Log-probabilities: the greedy token is the most likely one; probabilities are <= 1.
    r = c.completions.create(model="m", prompt="Life is", max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    check(len(lp.tokens) == r.usage.completion_tokens and all(v <= 0 for v in lp.token_logprobs),
          f"{name}: completions logprobs, one per token")
    check(all(len(t) == 3 and abs(max(t.values()) - v) < 1e-5 for t, v in zip(lp.top_logprobs, lp.token_logprobs)),
          f"{name}: the greedy token's logprob is the best of top_logprobs")
    r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0,
                                  logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    check(len(content) == r.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
          and all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-5 for t in content),
          f"{name}: chat logprobs with top_logprobs")

    # Errors, through the client.
    st, body = error_of(lambda: c.completions.create(model="other", prompt="x", max_tokens=2))
    check(st == 404 and body.get("code") == "model_not_found", f"{name}: unknown model -> 404 model_not_found")
    st, body = error_of(lambda: c.completions.create(model="m", prompt="x", max_tokens=2, temperature=5))
    check(st == 400 and body.get("param") == "temperature", f"{name}: temperature 5 -> 400 naming temperature")
    st, body = error_of(lambda: c.completions.create(model="m", prompt="x", max_tokens=10**6))
    check(st == 400 and body.get("code") == "context_length_exceeded", f"{name}: huge max_tokens -> 400")
    st, body = error_of(lambda: c.completions.create(model="m", prompt="word " * 400, max_tokens=2))
    check(st == 400 and body.get("code") == "context_length_exceeded", f"{name}: prompt past the context -> 400")
    st, body = error_of(lambda: c.chat.completions.create(model="m", messages=[{"role": "robot", "content": "x"}]))
    check(st == 400 and "role" in body.get("param", ""), f"{name}: unknown role -> 400")
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="wrong", max_retries=0)
    st, body = error_of(lambda: bad.models.list())
    check(st == 401 and body.get("code") == "invalid_api_key", f"{name}: wrong API key -> 401")

    # Errors the client would not send.
    st, data = s.raw("POST", "/v1/completions", body=b"{not json")
    check(st == 400 and json.loads(data)["error"]["code"] == "invalid_json", f"{name}: malformed JSON -> 400")
    st, data = s.raw("POST", "/v1/completions", body=b'{"model": "m", "prompt": "\xff\xfe", "max_tokens": 2}')
    check(st == 400 and "error" in json.loads(data), f"{name}: invalid UTF-8 -> 400")
    st, data = s.raw("POST", "/v1/completions", body=json.dumps({"model": "m", "prompt": "x", "max_tokens": "2"}))
    check(st == 400 and json.loads(data)["error"]["param"] == "max_tokens", f"{name}: a string max_tokens -> 400")
    st, data = s.raw("POST", "/v1/completions", body=json.dumps({"model": "m", "prompt": "x", "temprature": 1}))
    check(st == 400 and "temperature" in json.loads(data)["error"]["message"], f"{name}: a misspelt field -> 400 naming it")
    st, data = s.raw("POST", "/v1/completions", body=b"x" * (10 << 20))
    check(st == 413 and "error" in json.loads(data), f"{name}: a 10 MB body -> 413")
    st, data = s.raw("GET", "/health")
    check(st == 200, f"{name}: /health")

    # A streaming client that goes away cancels its request.
    before = s.metrics().get('dsopen_requests_total{outcome="cancelled"}', 0)
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "m", "prompt": "A", "max_tokens": 200,
                                                               "stream": True, "ignore_eos": True}),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.readline()
    conn.sock.close()
    conn.close()
    cancelled = False
    for _ in range(100):
        if s.metrics().get('dsopen_requests_total{outcome="cancelled"}', 0) > before:
            cancelled = True
            break
        time.sleep(0.1)
    check(cancelled, f"{name}: a disconnected streaming client cancels its request")
    m = s.metrics()
    check(m["dsopen_requests_running"] == 0 and m["dsopen_kv_cache_usage_ratio"] == 0,
          f"{name}: nothing left running, the KV cache free")
    check(m["dsopen_generation_tokens_total"] > 0 and m['dsopen_http_responses_total{code="400"}'] >= 5,
          f"{name}: /metrics counts tokens and responses")
    check(s.stop() == 0, f"{name}: SIGTERM -> exit 0")


def test_queue_and_shutdown(model):
    # One sequence at a time, three waiting at most: a request with n=3 runs one choice and queues two (they wait
    # for its row), so a request of two more is refused with 429, and one larger than the queue with 400.
    s = Server(model, "--max-num-seqs", "1", "--max-waiting", "3")
    long_req = {"model": "m", "prompt": "A", "max_tokens": 250, "ignore_eos": True}
    results = {}

    def post():
        results["n=3"] = s.raw("POST", "/v1/completions", body=json.dumps({**long_req, "n": 3}))[0]

    t1 = threading.Thread(target=post)
    t1.start()
    deadline = time.time() + 30
    while s.metrics()["dsopen_requests_waiting"] < 2 and time.time() < deadline:
        time.sleep(0.005)
    st, data = s.raw("POST", "/v1/completions", body=json.dumps({**long_req, "n": 2}))
    check(st == 429 and json.loads(data)["error"]["code"] == "queue_full", f"a full queue -> 429 (got {st})")
    st, data = s.raw("POST", "/v1/completions", body=json.dumps({**long_req, "n": 4}))
    check(st == 400 and json.loads(data)["error"]["param"] == "n", f"n beyond what the queue takes -> 400 (got {st})")
    t1.join()
    check(results == {"n=3": 200}, "the queued request still finishes")

    # SIGTERM during a stream: the stream completes, new requests are refused, the process exits 0.
    stream = s.client.completions.create(model="m", prompt="A", max_tokens=100, stream=True,
                                         extra_body={"ignore_eos": True})
    first = next(iter(stream))
    s.proc.send_signal(signal.SIGTERM)
    rest = list(stream)
    check(rest and rest[-1].choices[0].finish_reason == "length", "a stream running at SIGTERM completes")
    check(s.proc.wait(timeout=60) == 0 and first is not None, "the server exits 0 after SIGTERM")


def test_long_requests(model):
    """Non-streaming requests that run past their first 2 s (answered chunked, a space each second): a client that
    goes away cancels its request even while tokens keep coming; one cut off by a shutdown fails as a transfer."""
    s = Server(model, "--max-num-seqs", "16", "--shutdown-grace", "1")
    body = json.dumps({"model": "m", "prompt": "A", "max_tokens": 8000, "n": 16, "ignore_eos": True})
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def send():
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        conn.request("POST", "/v1/completions", body=body, headers=headers)
        return conn, conn.getresponse()  # the status comes after 2 s

    before = s.metrics().get('dsopen_requests_total{outcome="cancelled"}', 0)
    conn, resp = send()
    check(resp.status == 200, f"a long non-streaming request is answered chunked (status {resp.status})")
    time.sleep(1)
    conn.sock.close()
    conn.close()
    deadline, m = time.time() + 15, {}
    while time.time() < deadline:
        m = s.metrics()
        if m.get('dsopen_requests_total{outcome="cancelled"}', 0) > before and m["dsopen_requests_running"] == 0:
            break
        time.sleep(0.1)
    check(m.get('dsopen_requests_total{outcome="cancelled"}', 0) > before and m["dsopen_requests_running"] == 0,
          "a non-streaming client that disconnects while tokens flow cancels its request")

    conn, resp = send()
    s.proc.send_signal(signal.SIGTERM)
    try:
        data, complete = resp.read(), True
    except (http.client.IncompleteRead, ConnectionError) as e:
        data, complete = getattr(e, "partial", b""), False
    check(not complete and b"shutting_down" in data,
          f"a non-streaming request cut off by a shutdown fails as a transfer, the error object in it: {data[-200:]!r}")
    check(s.proc.wait(timeout=60) == 0, "the server exits 0 after cutting a request off")


def test_default_name(run_dir):
    """Without --served-model-name a run directory is served under its own name (its latest checkpoint's weights)."""
    proc = subprocess.Popen([b("serve"), "--model", run_dir + "/", "--port", "0", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("listening on"):
        sys.exit(f"dsopen-serve did not start: {line}{proc.stderr.read()}")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{int(line.rsplit(':', 1)[1])}/v1", api_key="x", max_retries=0)
    ids = [m.id for m in client.models.list().data]
    check(ids == [os.path.basename(run_dir)], f"a run directory is served under its name: {ids}")
    proc.send_signal(signal.SIGTERM)
    check(proc.wait(timeout=60) == 0, "default name: SIGTERM -> exit 0")


def make_adapter(model, out, seed):
    """A PEFT LoRA adapter with random (non-zero) weights for the model directory, written by peft itself."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))
    with torch.no_grad():  # a visible effect on a small model
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 4.0)
    peft_model.save_pretrained(out)
    return out


def test_adapters(model):
    # Two adapters over one base, chosen per request by `model`, batched together.
    a = make_adapter(model, os.path.join(W, "adapter-a"), 1)
    bdir = make_adapter(model, os.path.join(W, "adapter-b"), 2)
    s = Server(model, "--adapter", f"a={a}", "--adapter", f"b={bdir}")
    listed = {m.id: getattr(m, "parent", None) for m in s.client.models.list().data}
    check(listed == {"m": None, "a": "m", "b": "m"}, f"/v1/models lists the adapters with their parent: {listed}")
    prompts = ["Life is", "The best way to", "Never trust a"]
    want = {(name, p): generate_with(model, p, 16, adapter) for name, adapter in (("m", None), ("a", a), ("b", bdir))
            for p in prompts}

    def complete(job):
        name, p = job
        r = s.client.completions.create(model=name, prompt=p, max_tokens=16, temperature=0,
                                        extra_body={"ignore_eos": True})
        return (r.choices[0].text, r.usage.completion_tokens)

    jobs = list(want)
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = dict(zip(jobs, pool.map(complete, jobs)))
    check(got == want, "requests on two adapters and the base, sent together, equal dsopen-generate --adapter")
    check(any(want[("a", p)] != want[("m", p)] for p in prompts), "the adapters change the text")
    st, body = error_of(lambda: s.client.completions.create(model="c", prompt="x", max_tokens=2))
    check(st == 404 and "'a'" in body.get("message", ""), "an unknown adapter -> 404 listing the served names")
    check(s.stop() == 0, "adapters: SIGTERM -> exit 0")


def generate_with(model, prompt, n, adapter):
    args = [b("generate"), "--model", model, "--prompt", prompt, "--max-new-tokens", str(n), "--temperature", "0",
            "--repetition-penalty", "1", "--json", "--threads", "1", "--ignore-eos"] + (["--adapter", adapter] if adapter else [])
    out = json.loads(must(args))
    return out["texts"][0], len(out["tokens"][0])


models = {name: H.train_small(name, m, steps=40, warmup=4) for name, m in MODELS.items()}
test_long_requests(H.train_small("long", MODELS["llama"].replace("max_position_embeddings: 256",
                                                                 "max_position_embeddings: 8192"), steps=2, warmup=1))
for name, model in models.items():
    test_model(name, model)
test_default_name(os.path.dirname(os.path.dirname(models["llama"])))
test_adapters(models["llama"])
test_queue_and_shutdown(models["llama"])
H.finish()
