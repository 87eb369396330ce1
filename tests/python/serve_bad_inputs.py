#!/usr/bin/env python3
"""dsopen-serve under a few hundred bad requests, then a normal one.

Seeded random mutations of valid completion and chat requests — every field given every wrong JSON type, values
out of range, truncated and byte-flipped bodies, invalid UTF-8, deeply nested JSON, unknown fields, huge
max_tokens, empty and missing prompts or messages — plus slow clients that send half a request and stall. Every
bad request must get a 4xx status with an OpenAI error object ({"error": {"message", "type", ...}}), never a 5xx
or a dropped connection; afterwards the server still answers a normal request with the same text as before, and
/metrics shows nothing left running.

Usage: serve_bad_inputs.py BIN_DIR
"""
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import time

from harness import Harness

H = Harness(sys.argv[1], "dsopen-serve-fuzz-")
W, b, must, check = H.work, H.b, H.must, H.check

model = H.train_small("fuzz", "{flavor: tiny-dense, vocab_size: 512, hidden_size: 64, intermediate_size: 128, "
                      "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, "
                      "max_position_embeddings: 128}", steps=5, vocab=500, micro_batch=2)
server = subprocess.Popen([b("serve"), "--model", model, "--port", "0", "--served-model-name", "m", "--threads", "1",
                           "--max-body-mb", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
line = server.stdout.readline()
if not line.startswith("listening on"):
    sys.exit(f"dsopen-serve did not start: {line}{server.stderr.read()}")
port = int(line.rsplit(":", 1)[1])


def post(path, body, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


GOOD = {
    "/v1/completions": {"model": "m", "prompt": "A fool and", "max_tokens": 8, "temperature": 0},
    "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                             "temperature": 0},
}
baseline = {p: json.loads(post(p, json.dumps(g))[1]) for p, g in GOOD.items()}
WRONG = [None, True, -1, 0, 1.5, 10**12, "x", "", [], [1], {}, {"a": 1}, "\u0000", -1e300]
rng = random.Random(1234)
cases = []
for path, good in GOOD.items():
    keys = list(good) + ["n", "top_p", "stop", "seed", "stream", "logprobs", "top_logprobs", "stream_options",
                         "frequency_penalty", "presence_penalty", "top_k", "repetition_penalty", "max_completion_tokens"]
    for key in keys:
        for value in WRONG:
            body = dict(good)
            body[key] = value
            cases.append((path, json.dumps(body).encode()))
    for _ in range(60):  # byte-level damage
        raw = bytearray(json.dumps(good).encode())
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        cases.append((path, bytes(raw)))
    raw = json.dumps(good).encode()
    cases += [(path, raw[:n]) for n in (0, 1, 5, len(raw) // 2, len(raw) - 1)]
    cases += [(path, b"[" * 200000 + b"]" * 200000), (path, b'{"a":' * 50000 + b"1" + b"}" * 50000),
              (path, json.dumps({**good, "model": "m\udcff"}, ensure_ascii=False).encode("utf-8", "surrogatepass")),
              (path, json.dumps({**good, "max_tokens": 10**9}).encode()), (path, json.dumps([good]).encode()),
              (path, json.dumps({**good, "unknown_field": 1}).encode()), (path, b"x" * (2 << 20))]
deep = 200000  # nested inside a field, not only at the top
cases += [("/v1/chat/completions", ('{"model":"m","messages":[{"role":"user","content":' + "[" * deep + "]" * deep +
                                    "}]}").encode()),
          ("/v1/completions", ('{"model":"m","prompt":"x","metadata":' + '{"a":' * deep + "1" + "}" * deep + "}").encode()),
          ("/v1/chat/completions", json.dumps({**GOOD["/v1/chat/completions"], "response_format": "text"}).encode()),
          ("/v1/chat/completions", json.dumps({**GOOD["/v1/chat/completions"],
                                               "messages": [{"role": "user", "content": [{"type": 5, "text": "x"}]}]}).encode()),
          ("/v1/completions", json.dumps({**GOOD["/v1/completions"], "prompt": ["a"] * 100000, "n": 16}).encode()),
          ("/v1/completions", json.dumps({**GOOD["/v1/completions"], "seed": 2**63}).encode()),
          ("/v1/completions", json.dumps({**GOOD["/v1/completions"], "seed": -2**63 - 1}).encode())]
cases += [("/v1/chat/completions", json.dumps({**GOOD["/v1/chat/completions"], "messages": m}).encode())
          for m in ([], [{}], [{"role": "user"}], [{"role": "user", "content": 5}], [{"role": 1, "content": "x"}],
                    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                    [{"role": "assistant", "content": "last"}], "hello")]
cases += [("/v1/completions", json.dumps({**GOOD["/v1/completions"], "prompt": p}).encode())
          for p in ([], [[]], [10**9], [-5], [1.5], "", [["a"]], "x " * 1000)]

bad_status, bad_body, dropped = [], [], []
for path, body in cases:
    try:
        status, data = post(path, body)
    except (ConnectionError, http.client.HTTPException, socket.timeout) as e:
        dropped.append((body[:80], repr(e)))
        continue
    # A mutation can still be a valid request (prompt "x", n 1, seed 0): then a whole response object.
    if status == 200:
        try:
            if data.startswith(b"data: "):  # a valid streaming request: server-sent events to [DONE]
                assert data.endswith(b"data: [DONE]\n\n") and b'"error"' not in data
            else:
                assert json.loads(data)["choices"]
        except Exception:  # noqa: BLE001
            bad_body.append((status, body[:80], data[:200]))
        continue
    if not 400 <= status < 500:
        bad_status.append((status, body[:120], data[:200]))
        continue
    try:
        err = json.loads(data)["error"]
        assert isinstance(err["message"], str) and err["message"] and "type" in err
    except Exception:  # noqa: BLE001
        bad_body.append((status, body[:80], data[:200]))
check(len(cases) > 300, f"{len(cases)} malformed or mutated requests sent")
check(not dropped, f"no connection dropped: {dropped[:3]}")
check(not bad_status, f"every answer is a 200 or a 4xx, never a 5xx: {bad_status[:3]}")
check(not bad_body, f"every 4xx carries an OpenAI error object, every 200 a response: {bad_body[:3]}")

# Requests that are certainly wrong, each with the status OpenAI gives.
c = GOOD["/v1/completions"]
MUST = [({**c, "temperature": "hot"}, 400), ({**c, "max_tokens": -1}, 400), ({**c, "n": 0}, 400),
        ({**c, "top_p": 0}, 400), ({**c, "stop": {}}, 400), ({**c, "stop": ["a"] * 5}, 400), ({**c, "seed": "1"}, 400),
        ({**c, "stream": "yes"}, 400), ({**c, "logprobs": 9}, 400), ({**c, "model": "other"}, 404),
        ({**c, "max_tokens": 10**9}, 400), ({**c, "prompt": [10**9]}, 400), ({**c, "prompt": []}, 400),
        ({**c, "frequency_penalty": 3}, 400), ({**c, "unknown_field": 1}, 400), ({**c, "stream_options": {}}, 400),
        ({**c, "seed": 2**63}, 400), ({**c, "prompt": ["a"] * 1000, "n": 16}, 400), ({**c, "n": 2, "prompt": [2**64 - 1]}, 400)]
wrong = [(body, want, st) for body, want in MUST for st in [post("/v1/completions", json.dumps(body))[0]] if st != want]
check(not wrong, f"each certainly-wrong request gets its status: {wrong[:3]}")

# A chunked body past --max-body-mb is refused as one with a Content-Length is, without echoing it back.
sock = socket.create_connection(("127.0.0.1", port), timeout=60)
sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n")
chunk = b'{"model":"m","prompt":"' + b"a" * 65536
try:
    sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    for _ in range(40):
        sock.sendall(b"%x\r\n" % 65536 + b"a" * 65536 + b"\r\n")
except OSError:
    pass
reply = b""
try:
    while b"\r\n\r\n" not in reply or len(reply) < 200:
        part = sock.recv(65536)
        if not part:
            break
        reply += part
except OSError:
    pass
sock.close()
check(reply.startswith(b"HTTP/1.1 413") and len(reply) < 5000, f"a chunked body over the limit -> 413, short: {reply[:60]!r}")

# A second server on the same port fails at start instead of sharing it.
r = subprocess.run([b("serve"), "--model", model, "--port", str(port)], capture_output=True, text=True, timeout=120)
check(r.returncode == 2 and "cannot listen" in r.stderr, f"a port in use is an error: {r.stderr.strip()[-200:]}")

# Slow clients: half a request, then silence; the server serves others meanwhile and drops them after its timeout.
slow = []
for _ in range(8):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\":")
    slow.append(s)
t0 = time.time()
status, data = post("/v1/completions", json.dumps(GOOD["/v1/completions"]))
check(status == 200 and time.time() - t0 < 30, "a normal request is served while slow clients stall")
for s in slow:
    s.close()

for path, good in GOOD.items():
    status, data = post(path, json.dumps(good))
    same = status == 200 and json.loads(data)["choices"] == baseline[path]["choices"]
    check(same, f"{path}: after the bad requests, a normal request gets the same answer as before")
# Requests whose clients went away finish as cancelled at the engine's next step: poll until they have (10 s).
for _ in range(100):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    metrics = conn.getresponse().read().decode()
    if "dsopen_requests_running 0" in metrics and "dsopen_requests_waiting 0" in metrics:
        break
    time.sleep(0.1)
check("dsopen_requests_running 0" in metrics and "dsopen_requests_waiting 0" in metrics,
      "nothing left running or waiting: " + " ".join(l for l in metrics.splitlines() if "requests_running" in l
                                                     or "requests_waiting" in l))
server.terminate()
check(server.wait(timeout=60) == 0, "the server exits 0 on SIGTERM")
H.finish()
