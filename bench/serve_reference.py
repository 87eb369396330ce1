#!/usr/bin/env python3
"""The serving baseline in Python: transformers `generate` called once per request, one request at a time, on the
same model directory, prompts drawn as bench/serve_load.py draws them, greedy, fixed output lengths (EOS ignored).
Prints one JSON object: requests, output tokens/s, request latency p50/p99 (ms).

Usage: serve_reference.py --model DIR [--duration 30] [--threads N] [--min-prompt 8 --max-prompt 200]
                          [--min-new 32 --max-new 128] [--seed 0]
"""
import argparse
import json
import random
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve_load import make_prompts  # the same prompt draw as the load generator

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--duration", type=float, default=30)
ap.add_argument("--threads", type=int, default=0)
ap.add_argument("--min-prompt", type=int, default=8)
ap.add_argument("--max-prompt", type=int, default=200)
ap.add_argument("--min-new", type=int, default=32)
ap.add_argument("--max-new", type=int, default=128)
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()
if args.threads > 0:
    torch.set_num_threads(args.threads)
rng = random.Random(args.seed)
prompts = make_prompts(rng, args.min_prompt, args.max_prompt)
tok = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
latencies, tokens = [], 0
with torch.inference_mode():
    ids = tok(prompts[0], return_tensors="pt").input_ids
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)  # warm-up
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.duration:
        ids = tok(rng.choice(prompts), return_tensors="pt").input_ids
        n = rng.randint(args.min_new, args.max_new)
        r0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        latencies.append(time.perf_counter() - r0)
        tokens += out.shape[1] - ids.shape[1]
    elapsed = time.perf_counter() - t0
latencies.sort()
pct = lambda p: round(1000 * latencies[min(len(latencies) - 1, int(round(p / 100 * (len(latencies) - 1))))], 1)  # noqa: E731
print(json.dumps({"impl": "transformers generate per request", "threads": torch.get_num_threads(),
                  "requests": len(latencies), "seconds": round(elapsed, 1),
                  "output_tokens_per_s": round(tokens / elapsed, 1), "latency_p50_ms": pct(50), "latency_p99_ms": pct(99)}))
