"""The PyTorch side of the training-throughput comparison: the same model (built by transformers from the
config.json that `dsopen-model-info --hf-config` writes), the same batch shape, random tokens, the same
precision, torch.optim.AdamW (fused where available), global-norm clipping at 1.0 — timed like
dsopen-bench-model --optimizer. With --compile the model runs under torch.compile (default mode; the warm-up step
compiles). Prints one JSON line, peak RSS included.
Usage: torch_reference.py CONFIG_JSON --batch B --seq-len T --precision fp32|bf16 --steps N --threads K [--compile]"""
import argparse, json, resource, time

import torch
import transformers

p = argparse.ArgumentParser()
p.add_argument("config")
p.add_argument("--batch", type=int, default=4)
p.add_argument("--seq-len", type=int, default=256)
p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
p.add_argument("--steps", type=int, default=3)
p.add_argument("--warmup", type=int, default=1)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
p.add_argument("--compile", action="store_true")
a = p.parse_args()

torch.set_num_threads(a.threads)
torch.manual_seed(0)
cfg = transformers.AutoConfig.from_pretrained(a.config)
model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
model.to(a.device).train()
forward = torch.compile(model) if a.compile else model
decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n]
no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed_tokens" not in n)]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                        lr=1e-4, betas=(0.9, 0.95), eps=1e-8, foreach=a.device == "cpu", fused=a.device == "cuda")
ids = torch.randint(3, cfg.vocab_size, (a.batch, a.seq_len), device=a.device)
labels = ids.roll(-1, 1)


def step():
    opt.zero_grad(set_to_none=False)
    with torch.autocast(a.device, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
        logits = forward(ids).logits
    loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def sync():
    if a.device == "cuda":
        torch.cuda.synchronize()


for _ in range(a.warmup):
    step()
sync()
t0 = time.perf_counter()
for _ in range(a.steps):
    step()
sync()
s = (time.perf_counter() - t0) / a.steps
peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"impl": "pytorch-compile" if a.compile else "pytorch", "peak_rss_mb": peak_rss_mb, "model": type(model).__name__, "batch": a.batch, "seq_len": a.seq_len,
                  "precision": a.precision, "device": a.device, "threads": a.threads, "ms_per_step": s * 1e3,
                  "tokens_per_s": a.batch * a.seq_len / s, "torch": torch.__version__}))
