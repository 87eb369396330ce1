#!/usr/bin/env python3
"""Load generator for dsopen-serve (or any OpenAI-compatible server): streaming completions from C concurrent
clients for a fixed time, prompts of mixed lengths, fixed output lengths per request (ignore_eos), as light on
the CPU as a client can be (raw asyncio HTTP, no JSON parsing but the last usage chunk) so it does not steal the
server's cores.

Prints one JSON object: requests, errors, requests/s, output tokens/s, TTFT and inter-token latency p50/p99 (ms),
the server's resident memory (MB) after the warm-up and at the end when --server-pid is given.

Usage: serve_load.py --url http://127.0.0.1:8000 --model NAME [--clients 32] [--duration 60] [--warmup 5]
                     [--min-prompt 8 --max-prompt 200 (words)] [--min-new 32 --max-new 128] [--seed 0]
"""
import argparse
import asyncio
import json
import random
import statistics
import time
from urllib.parse import urlparse

FORTUNES = "/usr/share/games/fortunes/fortunes"


def make_prompts(rng, min_words, max_words, count=200):
    """`count` prompts of min..max words cut from fortunes at random places."""
    words = open(FORTUNES, encoding="utf-8", errors="replace").read().split()
    prompts = []
    for _ in range(count):
        n = rng.randint(min_words, max_words)
        start = rng.randrange(len(words) - n)
        prompts.append(" ".join(words[start:start + n]))
    return prompts


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def percentile(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def one_request(host, port, body, stats):
    """One streaming completion; appends TTFT, inter-token gaps and tokens to stats."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    data = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        writer.close()
        raise RuntimeError(status.decode(errors="replace").strip())
    first, last, gaps, usage = None, None, [], None
    async for line in reader:  # chunked transfer: size lines and data lines interleave; data lines start "data: "
        if not line.startswith(b"data: "):
            continue
        now = time.perf_counter()
        if line.startswith(b"data: [DONE]"):
            break
        if b'"usage":{' in line:
            usage = json.loads(line[6:])["usage"]
            continue
        if b'"text":""' in line:
            continue
        if first is None:
            first = now
        else:
            gaps.append(now - last)
        last = now
    writer.close()
    if usage is None:
        raise RuntimeError("no usage chunk")
    stats["ttft"].append(first - t0 if first else None)
    stats["itl"].extend(gaps)
    stats["tokens"] += usage["completion_tokens"]
    stats["requests"] += 1


async def client(host, port, args, prompts, rng, stats, stop_at):
    while time.perf_counter() < stop_at:
        body = {"model": args.model, "prompt": rng.choice(prompts), "max_tokens": rng.randint(args.min_new, args.max_new),
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0}
        try:
            await one_request(host, port, body, stats)
        except Exception as e:  # noqa: BLE001 - every failure counts as an error
            stats["errors"] += 1
            stats["error_samples"].append(str(e)[:200])


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--warmup", type=float, default=5)
    ap.add_argument("--min-prompt", type=int, default=8)
    ap.add_argument("--max-prompt", type=int, default=200)
    ap.add_argument("--min-new", type=int, default=32)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-pid", type=int)
    args = ap.parse_args()
    u = urlparse(args.url)
    rng = random.Random(args.seed)
    prompts = make_prompts(rng, args.min_prompt, args.max_prompt)

    # Warm-up (not counted): the same load for a few seconds, then the measured run.
    warm = {"ttft": [], "itl": [], "tokens": 0, "requests": 0, "errors": 0, "error_samples": []}
    stop = time.perf_counter() + args.warmup
    await asyncio.gather(*(client(u.hostname, u.port, args, prompts, random.Random(args.seed + i), warm, stop)
                           for i in range(args.clients)))
    rss_start = rss_mb(args.server_pid) if args.server_pid else None
    stats = {"ttft": [], "itl": [], "tokens": 0, "requests": 0, "errors": warm["errors"], "error_samples": warm["error_samples"]}
    t0 = time.perf_counter()
    stop = t0 + args.duration
    await asyncio.gather(*(client(u.hostname, u.port, args, prompts, random.Random(args.seed + 100 + i), stats, stop)
                           for i in range(args.clients)))
    elapsed = time.perf_counter() - t0
    rss_end = rss_mb(args.server_pid) if args.server_pid else None
    ttft = [x for x in stats["ttft"] if x is not None]
    ms = lambda x: None if x is None else round(1000 * x, 1)  # noqa: E731
    print(json.dumps({
        "clients": args.clients, "seconds": round(elapsed, 1), "requests": stats["requests"], "errors": stats["errors"],
        "error_samples": stats["error_samples"][:3],
        "requests_per_s": round(stats["requests"] / elapsed, 2), "output_tokens_per_s": round(stats["tokens"] / elapsed, 1),
        "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p99_ms": ms(percentile(ttft, 99)),
        "itl_p50_ms": ms(percentile(stats["itl"], 50)), "itl_p99_ms": ms(percentile(stats["itl"], 99)),
        "mean_tokens_per_request": round(stats["tokens"] / max(1, stats["requests"]), 1),
        "server_rss_mb_after_warmup": rss_start, "server_rss_mb_end": rss_end,
    }))


if __name__ == "__main__":
    asyncio.run(main())
