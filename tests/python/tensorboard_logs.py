#!/usr/bin/env python3
"""dsopen-train's TensorBoard event files, read by TensorBoard's own reader (EventAccumulator).

Every number of metrics.jsonl is a scalar at the same step (train/<key>, eval/loss, eval/ppl,
moe/imbalance/<block>); each MoE block's expert-load histogram counts the token copies routed in the step
(tokens x num_experts_per_tok), and expert_load.jsonl holds the same counts per expert; the resolved config is there as text; a file cut inside its last record (what a
SIGKILL mid-write leaves) still loads every complete record.

Usage: tensorboard_logs.py BIN_DIR
"""
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

BIN = sys.argv[1]
W = tempfile.mkdtemp(prefix="dsopen-tb-")
FORTUNES = "/usr/share/games/fortunes/fortunes"
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def must(args):
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


B, T, TOPK = 2, 32, 2
with open(os.path.join(W, "run.yaml"), "w") as f:
    f.write(f"""run: {{name: tb, output_dir: {W}/run, seed: 3, log_every: 2, threads: 2}}
model: {{flavor: debug, vocab_size: 400, use_mtp: true, num_experts_per_tok: {TOPK}}}
tokenizer:
  path: {W}/tok.model
  train: {{inputs: [{FORTUNES}], vocab_size: 400, character_coverage: 0.999}}
data:
  train: [{W}/shards/f_*.bin]
  valid_fraction: 0.05
  seq_len: {T}
  build: {{inputs: [{FORTUNES}], output: {W}/shards/f, doc_separator: "%"}}
train: {{max_steps: 7, micro_batch_size: {B}, lr: 1.0e-3, eval_every: 3}}
checkpoint: {{every: 0}}
""")
must([os.path.join(BIN, "dsopen-train"), "--config", os.path.join(W, "run.yaml")])

records = [json.loads(line) for line in open(os.path.join(W, "run/metrics.jsonl"))]
ea = EventAccumulator(os.path.join(W, "run/tb"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
ea.Reload()
tags = ea.Tags()


def scalars(tag):
    return {s.step: s.value for s in ea.Scalars(tag)} if tag in tags["scalars"] else {}


compared, wrong = 0, []
for rec in records:
    step = rec["step"]
    expected = {}
    for key, value in rec.items():
        if key == "step":
            continue
        if key == "eval_loss":
            expected["eval/loss"] = value
        elif key == "eval_ppl":
            expected["eval/ppl"] = value
        elif isinstance(value, dict):
            expected.update({f"moe/imbalance/{block}": v for block, v in value.items()})
        elif isinstance(value, (int, float)) and value is not None:
            expected[f"train/{key}"] = value
    for tag, value in expected.items():
        got = scalars(tag).get(step)
        compared += 1
        if got is None or not math.isclose(got, value, rel_tol=1e-6, abs_tol=1e-6):
            wrong.append((tag, step, value, got))
check(compared > 50 and not wrong, f"{compared} metrics.jsonl values equal TensorBoard scalars ({wrong[:3]})")
check(any(r.get("eval_loss") for r in records) and "eval/loss" in tags["scalars"], "evaluation scalars are there")

hist_tags = [t for t in tags["histograms"] if t.startswith("moe/expert_load/")]
# Tokens trained on (with a target) in a step, where metrics.jsonl has the step before it too.
tokens = {r["step"]: r["tokens"] for r in records if "tokens" in r}
per_step = {s: tokens[s] - tokens.get(s - 1, 0) for s in tokens if s == 1 or s - 1 in tokens}
# The MTP module's MoE block (model.layers.{num_hidden_layers}) sees one position fewer per row: its input at the
# last position would need a token beyond the row.
HF = json.load(open(os.path.join(W, "run/checkpoints/step_00000007/config.json")))
L, EXPERTS = HF["num_hidden_layers"], HF["n_routed_experts"]


def routed(tag, step):
    mtp = int(tag.split("model.layers.")[1].split(".")[0]) >= L
    return TOPK * (per_step[step] - (B if mtp else 0))


bad = [(t, h.step, h.histogram_value.num) for t in hist_tags for h in ea.Histograms(t)
       if h.step in per_step and h.histogram_value.num != routed(t, h.step)]
checked = sum(1 for t in hist_tags for h in ea.Histograms(t) if h.step in per_step)
check(len(hist_tags) >= 1 and checked >= 2 * len(hist_tags) and not bad,
      f"expert-load histograms of {len(hist_tags)} MoE blocks count {TOPK} copies of each token trained on "
      f"({checked} checked: {bad[:3]})")
# expert_load.jsonl (the layer x expert map of dsopen-plot) holds the same counts as the histograms.
loads = {r["step"]: r["expert_load"] for r in map(json.loads, open(os.path.join(W, "run/expert_load.jsonl")))}
bad = [(block, step) for step, per_block in loads.items() for block, v in per_block.items()
       if step in per_step and sum(v) != routed(f"moe/expert_load/{block}", step)]
hist_sums = {(t[len("moe/expert_load/"):], h.step): h.histogram_value.sum for t in hist_tags for h in ea.Histograms(t)}
check(set(loads) == {r["step"] for r in records if "loss" in r} and not bad and
      all(len(v) == EXPERTS for per_block in loads.values() for v in per_block.values()) and
      all(math.isclose(hist_sums[(b, s)], sum(i * x for i, x in enumerate(v)), abs_tol=1e-6)
          for s, per_block in loads.items() for b, v in per_block.items()),
      f"expert_load.jsonl: one record per logged step, {EXPERTS} experts per block, the histograms' counts ({bad[:3]})")
text = ea.Tensors("config")[0].tensor_proto.string_val[0].decode() if "config" in tags["tensors"] else ""
check("micro_batch_size" in text, "the resolved config is a text summary")

# A torn last record: the reader keeps every complete one.
event_file = glob.glob(os.path.join(W, "run/tb/events.out.tfevents.*"))[0]
torn = os.path.join(W, "torn")
os.makedirs(torn)
data = open(event_file, "rb").read()
open(os.path.join(torn, os.path.basename(event_file)), "wb").write(data[:-7])
ea2 = EventAccumulator(torn, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
ea2.Reload()
full = sum(len(ea.Scalars(t)) for t in tags["scalars"]) + sum(len(ea.Histograms(t)) for t in hist_tags)
cut = sum(len(ea2.Scalars(t)) for t in ea2.Tags()["scalars"]) + \
    sum(len(ea2.Histograms(t)) for t in ea2.Tags()["histograms"])
check(cut == full - 1, f"a file cut inside its last record loads the {full - 1} complete ones (got {cut})")

# --- pictures: the trainer's loss.png and dsopen-plot over two runs -------------------------------------------------
def png_size(path):
    data = open(path, "rb").read(24)
    ok = data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) if ok else None


def colours(path):
    from PIL import Image
    return len(Image.open(path).convert("RGB").getcolors(maxcolors=1 << 24) or [])


own = os.path.join(W, "run/loss.png")
check(os.path.exists(own) and png_size(own) == (1400, 1000) and colours(own) > 50,
      "the trainer drew <output_dir>/loss.png (1400x1000, curves on it)")
must([os.path.join(BIN, "dsopen-train"), "--config", os.path.join(W, "run.yaml"), "--set", f"run.output_dir={W}/run2",
      "--set", "train.max_steps=3", "--set", "train.lr=3e-3"])
two = os.path.join(W, "two.png")
must([os.path.join(BIN, "dsopen-plot"), os.path.join(W, "run"), os.path.join(W, "run2"), "--out", two,
      "--width", "900", "--height", "600"])
check(png_size(two) == (900, 600) and colours(two) > 50, f"dsopen-plot on two runs writes a 900x600 PNG ({png_size(two)})")
r = subprocess.run([os.path.join(BIN, "dsopen-plot"), W, "--out", os.path.join(W, "none.png")], capture_output=True, text=True)
errors = [l for l in r.stderr.splitlines() if "error:" in l]
check(r.returncode == 1 and len(errors) == 1 and "metrics.jsonl: not found" in errors[0] and
      not os.path.exists(os.path.join(W, "none.png")), f"a directory without metrics is one error line: {errors}")

print(f"\n{len(failures)} failures")
if not failures:
    shutil.rmtree(W)
sys.exit(1 if failures else 0)
