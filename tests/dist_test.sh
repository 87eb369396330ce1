#!/usr/bin/env bash
# Data-parallel training across real processes (Gloo on the CPU), started by scripts/launch.sh:
#   - 1, 2 and 4 ranks at the same global batch give the same losses (≤1e-5) for ddp, zero1 and zero2;
#   - zero2's optimizer state per rank is total/N within padding, its gradient memory a fraction of ddp's;
#   - a checkpoint saved by 4 ranks resumes on 2 and on 1 rank and continues the 4-rank losses;
#   - two launcher invocations (--nnodes 2) train together like one node;
#   - SFT with MTP, z-loss, aux loss and bias updates: 2 ranks x 2 micro-batches == 1 rank x 4 (metrics, weights);
#   - SIGKILL of one rank stops every rank within 60 s with a non-zero code, leaving a resumable checkpoint;
#   - expert parallelism (E=2, E=4, E=2 x 2 replicas) equals 1 rank, holds 1/E of the experts per rank, resumes
#     across layouts, and a rank killed inside its all-to-alls stops every rank;
#   - zero3 (MoE + MTP, dense with tied embeddings, LoRA, expert parallelism; checkpointing on and off) equals 1
#     rank, holds 1/N of the parameters plus at most two gathered units, and its checkpoint resumes under zero2 and
#     unsharded.
set -u
BIN="$1"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
LAUNCH="$ROOT/scripts/launch.sh"
W="$(mktemp -d)"
trap 'rm -rf "$W"' EXIT
fail=0
port=$((20000 + RANDOM % 20000))
next_port() { port=$((port + 7)); }

cat > "$W/base.yaml" <<YAML
run: {name: dist, output_dir: $W/run, seed: 3, log_every: 1}
model: {flavor: debug, vocab_size: 512}
tokenizer:
  path: $W/tok.model
  train: {inputs: [/usr/share/games/fortunes/fortunes], vocab_size: 512, character_coverage: 0.999}
data:
  train: [$W/shards/f_*.bin]
  seq_len: 32
  build: {inputs: [/usr/share/games/fortunes/fortunes], output: $W/shards/f, doc_separator: "%"}
train: {max_steps: 20, micro_batch_size: 2, grad_accum_steps: 4, lr: 2.0e-3, min_lr: 1.0e-4, warmup_steps: 3}
parallel: {bucket_mb: 0.02}
checkpoint: {every: 10, keep_last: 5, resume: none}
YAML

train() {  # [CONFIG=file] train NAME NPROC STRATEGY ACCUM [extra --set ...]
  local name="$1" n="$2" strategy="$3" accum="$4"; shift 4
  next_port
  "$LAUNCH" --nproc-per-node "$n" --master-port "$port" -- "$BIN/dsopen-train" --config "${CONFIG:-$W/base.yaml}" \
    --set run.output_dir="$W/$name" --set parallel.strategy="$strategy" --set train.grad_accum_steps="$accum" "$@" \
    > "$W/$name.log" 2>&1
  local rc=$?
  if [ $rc != 0 ]; then echo "FAIL $name: exit $rc"; tail -5 "$W/$name.log"; fail=1; else echo "ok   $name"; fi
}

# kill_rank1 NAME LAUNCHER_PID: SIGKILLs rank 1 of the run writing to $W/NAME and waits for its launcher; sets rc (the
# launcher's exit code), took (seconds until it exited) and left (processes of the run still alive). Returns 1 when
# rank 1 is not found.
kill_rank1() {
  local name="$1" launcher="$2" victim start
  victim="$(pgrep -f "run.output_dir=$W/$name" | while read -r p; do
    [ "$(tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -x 'RANK=1')" ] && echo "$p"; done | head -1)"
  [ -n "$victim" ] || return 1
  start=$(date +%s)
  kill -KILL "$victim"
  wait "$launcher"; rc=$?
  took=$(( $(date +%s) - start ))
  left="$(pgrep -f "run.output_dir=$W/$name" | wc -l)"
}

# The single-process reference builds the tokenizer and shards the others reuse.
train r1 1 none 8
for s in ddp zero1 zero2; do
  train "${s}_2" 2 "$s" 4
  train "${s}_4" 4 "$s" 2
done

# An epoch ending inside a step (the debug data holds 362 samples of 32 tokens; 64 per step): 4 ranks start the
# next epoch at the same step as 1 rank and keep training on the same samples.
train wrap_1 1 none 16 --set train.micro_batch_size=4 --set train.max_steps=8 --set checkpoint.every=0
train wrap_4 4 zero2 4 --set train.micro_batch_size=4 --set train.max_steps=8 --set checkpoint.every=0
python3 - "$W" <<'PY' || fail=1
import json, sys
rows = lambda run: {j["step"]: j["loss"] for j in map(json.loads, open(f"{sys.argv[1]}/{run}/metrics.jsonl")) if "loss" in j}
a, b = rows("wrap_1"), rows("wrap_4")
err = max(abs(a[s] - b[s]) for s in a)
print(f"{'ok  ' if err <= 1e-5 and len(a) == 8 else 'FAIL'} across an epoch end 4 ranks match 1 rank: max |dloss| = {err:.2e}")
sys.exit(0 if err <= 1e-5 and len(a) == 8 else 1)
PY

# Two "nodes" on this machine: two launchers, two ranks each, one loopback master.
next_port
for node in 0 1; do
  "$LAUNCH" --nnodes 2 --node-rank $node --nproc-per-node 2 --master-port "$port" -- "$BIN/dsopen-train" \
    --config "$W/base.yaml" --set run.output_dir="$W/nodes" --set parallel.strategy=zero2 \
    --set train.grad_accum_steps=2 > "$W/nodes_$node.log" 2>&1 &
done
wait -n; rc1=$?; wait -n; rc2=$?
if [ $rc1 != 0 ] || [ $rc2 != 0 ]; then echo "FAIL two nodes: exit $rc1 $rc2"; tail -n 5 "$W"/nodes_*.log; fail=1; else echo "ok   two nodes"; fi

# Resume the 4-rank zero2 run's step-10 checkpoint on 2 ranks (zero2) and on 1 rank (unsharded state).
CK="$W/zero2_4/checkpoints/step_00000010"
train resume_2 2 zero2 4 --set checkpoint.resume="$CK" --set checkpoint.dir="$W/resume_2/ck"
train resume_1 1 none 8 --set checkpoint.resume="$CK" --set checkpoint.dir="$W/resume_1/ck"
# A resume on another number of ranks says what becomes of the global batch.
if grep -q "was trained on 4 ranks, this run has 2: a step now takes 2 x 4 x 2 = 16 sequences" "$W/resume_2.log"; then
  echo "ok   a resume on fewer ranks names the new global batch"
else echo "FAIL resume_2: no warning about the global batch"; fail=1; fi

python3 - "$W" <<'PY' || fail=1
import json, re, sys
W = sys.argv[1]
def losses(run):
    return {j["step"]: j["loss"] for j in map(json.loads, open(f"{W}/{run}/metrics.jsonl")) if "loss" in j}
ref = losses("r1")
assert len(ref) == 20, ref
ok = True
for run in ["ddp_2", "ddp_4", "zero1_2", "zero1_4", "zero2_2", "zero2_4", "nodes"]:
    got = losses(run)
    err = max(abs(got[s] - ref[s]) for s in ref)
    print(f"{'ok  ' if err <= 1e-5 else 'FAIL'} {run} matches 1 rank: max |dloss| = {err:.2e}")
    ok &= err <= 1e-5
four = losses("zero2_4")
for run in ["resume_2", "resume_1"]:
    got = losses(run)
    assert sorted(got) == list(range(11, 21)), sorted(got)
    err = max(abs(got[s] - four[s]) for s in got)
    print(f"{'ok  ' if err <= 1e-5 else 'FAIL'} {run} continues the 4-rank run: max |dloss| = {err:.2e}")
    ok &= err <= 1e-5

def memory(run, rank):
    text = open(f"{W}/{run}/logs/rank_{rank}.log").read()
    m = re.findall(r"memory rank \d+: optimizer_state_bytes=(\d+) grad_bytes=(\d+) .* "
                   r"grad_buckets_in_flight_peak_bytes=(\d+) bucket_bytes=(\d+)", text)
    return tuple(map(int, m[-1]))
total_state, total_grad, _, _ = memory("r1", 0)  # unsharded: 8P and 4P bytes
for n in (2, 4):
    for rank in range(n):
        state, grad, in_flight, bucket = memory(f"zero2_{n}", rank)
        ddp_state, ddp_grad, _, _ = memory(f"ddp_{n}", rank)
        # Padding: fewer than n values per bucket (4 bytes of gradient, 8 of moments each); < 64 buckets here.
        # Gradients: this rank's 1/N slices plus the buckets travelling during backward (at most a few).
        good = (0 <= state - total_state / n <= 8 * 64 * n and ddp_state == total_state and ddp_grad == total_grad
                and 0 <= grad - in_flight - total_grad / n <= 4 * 64 * n and in_flight <= 4 * bucket)
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} zero2 {n} ranks, rank {rank}: state {state} B vs total/N "
              f"{total_state / n:.0f}; gradients {grad - in_flight} B + {in_flight} B in flight (bucket {bucket} B) "
              f"vs total/N {total_grad / n:.0f}")
sys.exit(0 if ok else 1)
PY

# Expert parallelism: the debug MoE model (8 routed experts, MTP on) with E=2 on 2 ranks (ddp), E=4 on 4 ranks
# (zero1) and E=2 x 2 replicas (4 ranks, zero2) equals 1 rank at the same global batch — losses, aux loss,
# imbalance, final weights and routing biases; each rank holds 1/E of the routed experts and their optimizer state;
# a checkpoint moves between layouts (E=4 on 4 ranks -> E=2 on 2 ranks -> 1 rank) and the curve continues.
# Adam's eps is 1e-6 here, as in the SFT case below: with 1e-8, gradients of ~1e-8 summed in another order (any
# data-parallel layout, expert parallelism or not) move single weights by ~2e-5 of their tensor's largest value.
EPS=(--set train.eps=1.0e-6)
train ep_1 1 none 8 "${EPS[@]}"
train ep_2 2 ddp 4 --set parallel.expert_parallel=2 "${EPS[@]}"
train ep_4 4 zero1 2 --set parallel.expert_parallel=4 "${EPS[@]}"
train ep_2x2 4 zero2 2 --set parallel.expert_parallel=2 "${EPS[@]}"
train ep_resume_2 2 zero2 4 --set parallel.expert_parallel=2 --set checkpoint.every=5 "${EPS[@]}" \
  --set checkpoint.resume="$W/ep_4/checkpoints/step_00000010" --set checkpoint.dir="$W/ep_resume_2/ck"
train ep_resume_1 1 none 8 --set checkpoint.resume="$W/ep_resume_2/ck/step_00000015" "${EPS[@]}" \
  --set checkpoint.dir="$W/ep_resume_1/ck"
python3 - "$W" <<'PY' || fail=1
import json, os, re, sys
from safetensors.torch import load_file
W = sys.argv[1]
def rows(run):
    return {j["step"]: j for j in map(json.loads, open(f"{W}/{run}/metrics.jsonl")) if "loss" in j}
def weights(ck):
    index = f"{ck}/model.safetensors.index.json"
    if not os.path.exists(index):
        return load_file(f"{ck}/model.safetensors")
    out = {}
    for shard in sorted(set(json.load(open(index))["weight_map"].values())):
        out.update(load_file(f"{ck}/{shard}"))
    return out
def rel(a, b):
    return abs(a - b) / max(abs(a), 1e-3)
ref, ok = rows("ep_1"), True
w1 = weights(f"{W}/ep_1/checkpoints/step_00000020")
expert_bytes = sum(t.numel() * 4 for k, t in w1.items() if re.search(r"\.experts\.\d+\.", k))
for run, E, replicas in [("ep_2", 2, 1), ("ep_4", 4, 1), ("ep_2x2", 2, 2)]:
    got = rows(run)
    err = max(rel(ref[s][k], got[s][k]) for s in ref for k in ("loss", "moe_aux_loss", "moe_imbalance", "mtp_loss"))
    w = weights(f"{W}/{run}/checkpoints/step_00000020")
    werr = max(((w1[k] - w[k]).abs().max() / w1[k].abs().max().clamp_min(1e-3)).item() for k in w1)
    biases = [k for k in w1 if k.endswith("e_score_correction_bias")]
    moved = len(biases) > 0 and all(w1[k].abs().max().item() > 0 for k in biases)
    shares = "ep_tokens_per_rank" in got[20] and len(got[20]["ep_tokens_per_rank"]) == E * replicas
    good = err <= 1e-5 and werr <= 1e-5 and w.keys() == w1.keys() and moved and shares
    print(f"{'ok  ' if good else 'FAIL'} {run}: E={E} x {replicas} matches 1 rank: max rel dmetric {err:.1e}, "
          f"max rel dweight {werr:.1e} ({len(w)} tensors, {len(biases)} routing biases), "
          f"all-to-all share {got[20].get('all_to_all_share', -1):.2f}")
    ok &= good
    for rank in range(E * replicas):
        text = open(f"{W}/{run}/logs/rank_{rank}.log").read()
        p, st = map(int, re.findall(r"expert_param_bytes=(\d+) expert_state_bytes=(\d+)", text)[-1])
        # Each rank: 1/E of the experts; moments 2x that, sharded over the replicas by zero1/zero2 (padding aside).
        shard = 1 if run == "ep_2" else replicas
        good = p * E == expert_bytes and 0 <= st - 2 * p / shard <= 8 * 64 * shard
        ok &= good
        if not good or rank == 0:
            print(f"{'ok  ' if good else 'FAIL'} {run} rank {rank}: routed experts {p} B (x{E} = {p * E} vs {expert_bytes}),"
                  f" optimizer state {st} B")
for run, steps in [("ep_resume_2", range(11, 21)), ("ep_resume_1", range(16, 21))]:
    got = rows(run)
    err = max(rel(ref[s]["loss"], got[s]["loss"]) for s in got)
    good = sorted(got) == list(steps) and err <= 1e-5
    print(f"{'ok  ' if good else 'FAIL'} {run} continues the curve after a change of layout: max rel dloss {err:.1e}")
    ok &= good
sys.exit(0 if ok else 1)
PY

# The tiny model's shapes (hidden 256, 4 layers, 8 routed experts in 4 groups, MTP) with E=2 equal 1 rank; and
# the expert-parallel checkpoints read on one process (dsopen-eval) give the 1-rank checkpoint's perplexity.
TINY=(--set model.flavor=tiny --set model.vocab_size=512 --set train.max_steps=10 --set checkpoint.every=0 "${EPS[@]}")
train ep_tiny_1 1 none 8 "${TINY[@]}"
train ep_tiny_2 2 zero2 4 --set parallel.expert_parallel=2 "${TINY[@]}"
for run in ep_1 ep_4 ep_2x2; do
  "$BIN/dsopen-eval" --model "$W/$run/checkpoints/step_00000020" --data "$W/shards/f_*.bin" --ppl --seq-len 32 \
    --batches 4 > "$W/$run.eval" 2>&1 || { echo "FAIL dsopen-eval on $run's checkpoint"; tail -3 "$W/$run.eval"; fail=1; }
done
python3 - "$W" <<'PY' || fail=1
import json, re, sys
W = sys.argv[1]
rows = lambda run: {j["step"]: j for j in map(json.loads, open(f"{W}/{run}/metrics.jsonl")) if "loss" in j}
a, b = rows("ep_tiny_1"), rows("ep_tiny_2")
err = max(abs(a[s][k] - b[s][k]) / max(abs(a[s][k]), 1e-3) for s in a for k in ("loss", "moe_aux_loss", "moe_imbalance", "mtp_loss"))
ok = len(a) == 10 and err <= 1e-5
print(f"{'ok  ' if ok else 'FAIL'} tiny model, E=2 matches 1 rank over 10 steps: max rel dmetric {err:.1e}")
ppl = {run: float(re.search(r"loss ([0-9.]+)", open(f"{W}/{run}.eval").read()).group(1)) for run in ("ep_1", "ep_4", "ep_2x2")}
good = all(abs(ppl[r] - ppl["ep_1"]) <= 2e-4 for r in ppl)  # printed to 4 decimals; the weights agree to ~5e-6
print(f"{'ok  ' if good else 'FAIL'} dsopen-eval on one process reads the expert-parallel checkpoints: loss {ppl}")
sys.exit(0 if ok and good else 1)
PY

# LoRA under expert parallelism: adapters on every projection, routed experts included, of the E=1 run's model;
# E=2 on 2 ranks equals 1 rank (losses, every adapter tensor of the one PEFT file), and resumes on 1 rank.
LORA=(--set model.pretrained="$W/ep_1/checkpoints/step_00000020" --set lora.enabled=true --set lora.r=4
      --set lora.routed_experts=true --set 'lora.target_modules=[q_a_proj, kv_a_proj_with_mqa, o_proj, gate_proj, up_proj, down_proj]'
      --set train.max_steps=6 --set checkpoint.every=3 "${EPS[@]}")
train ep_lora_1 1 none 8 "${LORA[@]}"
train ep_lora_2 2 zero2 4 --set parallel.expert_parallel=2 "${LORA[@]}"
train ep_lora_dp 2 zero2 4 "${LORA[@]}"  # the same 2 ranks without expert parallelism: its summation-order error
train ep_lora_resume 1 none 8 "${LORA[@]}" --set checkpoint.resume="$W/ep_lora_2/checkpoints/step_00000003" \
  --set checkpoint.dir="$W/ep_lora_resume/ck"
python3 - "$W" <<'PY' || fail=1
import json, sys
from safetensors.torch import load_file
W = sys.argv[1]
def rows(run):
    return {j["step"]: j["loss"] for j in map(json.loads, open(f"{W}/{run}/metrics.jsonl")) if "loss" in j}
a, b, c = rows("ep_lora_1"), rows("ep_lora_2"), rows("ep_lora_resume")
err = max(abs(a[s] - b[s]) / a[s] for s in a)
rerr = max(abs(a[s] - c[s]) / a[s] for s in c)
adapter = lambda run: load_file(f"{W}/{run}/checkpoints/step_00000006/adapter_model.safetensors")
wa, wb, wd = adapter("ep_lora_1"), adapter("ep_lora_2"), adapter("ep_lora_dp")
experts = sum(".experts." in k for k in wa)
diff = lambda w: max(((wa[k] - w[k]).abs().max() / wa[k].abs().max().clamp_min(1e-3)).item() for k in wa)
# lora_B starts at zero and its first gradients are tiny, so any change of summation order (2 ranks with or without
# expert parallelism) moves it by ~1e-5 of its largest value; expert parallelism must add nothing to that.
werr, dperr = diff(wb), diff(wd)
good = (sorted(b) == list(range(1, 7)) and sorted(c) == [4, 5, 6] and err <= 1e-5 and rerr <= 1e-5
        and wa.keys() == wb.keys() and experts > 0 and werr <= max(1e-5, 3 * dperr) and werr <= 1e-4)
print(f"{'ok  ' if good else 'FAIL'} LoRA with E=2 matches 1 rank: max rel dloss {err:.1e}, {len(wa)} adapter tensors "
      f"({experts} on routed experts) max rel d {werr:.1e} (2 ranks without EP: {dperr:.1e}); "
      f"resumed on 1 rank: max rel dloss {rerr:.1e}")
sys.exit(0 if good else 1)
PY

# ZeRO-3: the debug MoE model with MTP (ep_1 is its 1-rank run) on 2 ranks and, with activation checkpointing, on
# 4; a dense model with tied embeddings on 2 (checkpointing) and 4 ranks; LoRA on its frozen base on 2 ranks. Each
# equals 1 rank (losses, final weights or adapters); each rank holds 1/N of the parameters (LoRA: of the frozen
# base too) plus at most two gathered units where zero2 holds them all; the 4-rank checkpoint resumes on 2 ranks
# with zero2, that one on 1.
DENSE_MODEL=(--set model.flavor=tiny-dense --set model.architecture=llama --set model.hidden_size=64
             --set model.intermediate_size=128 --set model.num_hidden_layers=3 --set model.num_attention_heads=2
             --set model.num_key_value_heads=2 --set model.tie_word_embeddings=true)
DENSE=("${DENSE_MODEL[@]}" --set train.max_steps=10 "${EPS[@]}")
ZLORA=("${DENSE_MODEL[@]}" --set model.pretrained="$W/z3_dense_1/checkpoints/step_00000010" --set lora.enabled=true
       --set lora.r=4 --set train.max_steps=6 --set checkpoint.every=0 "${EPS[@]}")
train z3_2 2 zero3 4 "${EPS[@]}"
train z3_4 4 zero3 2 --set train.activation_checkpointing=true "${EPS[@]}"
train z3_ep_2x2 4 zero3 2 --set parallel.expert_parallel=2 "${EPS[@]}"
train z3_ep_lora 2 zero3 4 --set parallel.expert_parallel=2 --set train.activation_checkpointing=true "${LORA[@]}"
train z3_dense_1 1 none 8 "${DENSE[@]}"
train z3_dense_2 2 zero3 4 --set train.activation_checkpointing=true "${DENSE[@]}"
train z3_dense_4 4 zero3 2 --set parallel.zero3_build=in_turns "${DENSE[@]}"  # the ranks build one at a time
train z3_lora_1 1 none 8 "${ZLORA[@]}"
train z3_lora_2 2 zero3 4 --set train.activation_checkpointing=true "${ZLORA[@]}"
train z3_to_zero2 2 zero2 4 --set checkpoint.resume="$W/z3_4/checkpoints/step_00000010" --set checkpoint.every=5 \
  --set checkpoint.dir="$W/z3_to_zero2/ck" "${EPS[@]}"
train z3_to_none 1 none 8 --set checkpoint.resume="$W/z3_to_zero2/ck/step_00000015" \
  --set checkpoint.dir="$W/z3_to_none/ck" "${EPS[@]}"
# Evaluation sees the same validation samples on 1, 2 or 4 ranks (4 ranks: a share of 1 or 2 of the 6 samples).
VALID=(--set data.valid_fraction=0.1 --set train.max_steps=2 --set train.eval_steps=3 --set checkpoint.every=0)
train eval_1 1 none 8 "${VALID[@]}"
train eval_2 2 zero3 4 "${VALID[@]}"
train eval_4 4 ddp 2 "${VALID[@]}"
python3 - "$W" <<'PY' || fail=1
import json, re, sys
import os
from safetensors.torch import load_file
W = sys.argv[1]
rows = lambda run: {j["step"]: j["loss"] for j in map(json.loads, open(f"{W}/{run}/metrics.jsonl")) if "loss" in j}
def weights(path):  # a file, or a checkpoint directory of HF shards
    if path.endswith(".safetensors"):
        return load_file(path)
    out = {}
    for shard in sorted(set(json.load(open(f"{path}/model.safetensors.index.json"))["weight_map"].values())):
        out.update(load_file(f"{path}/{shard}"))
    return out
def wdiff(a, b):
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-3)).item() for k in a)
ok = True
ev = {run: [j["eval_loss"] for j in map(json.loads, open(f"{W}/{run}/metrics.jsonl")) if "eval_loss" in j]
      for run in ("eval_1", "eval_2", "eval_4")}
good = all(len(v) == 1 for v in ev.values()) and max(abs(v[0] - ev["eval_1"][0]) for v in ev.values()) <= 1e-6 * ev["eval_1"][0]
print(f"{'ok  ' if good else 'FAIL'} evaluation on 1, 2 and 4 ranks sees the same samples: {ev}")
ok &= good
for ref, run, ck, steps in [("ep_1", "z3_2", "step_00000020/model.safetensors", 20),
                            ("ep_1", "z3_4", "step_00000020/model.safetensors", 20),
                            ("ep_1", "z3_ep_2x2", "step_00000020", 20),
                            ("z3_dense_1", "z3_dense_2", "step_00000010/model.safetensors", 10),
                            ("z3_dense_1", "z3_dense_4", "step_00000010/model.safetensors", 10),
                            ("z3_lora_1", "z3_lora_2", "step_00000006/adapter_model.safetensors", 6)]:
    a, b = rows(ref), rows(run)
    err = max(abs(a[s] - b[s]) / a[s] for s in a)
    ref_ck = f"{W}/{ref}/checkpoints/{ck}"
    werr = wdiff(weights(ref_ck if ref_ck.endswith(".safetensors") else ref_ck + "/model.safetensors"),
                 weights(f"{W}/{run}/checkpoints/{ck}"))
    good = len(a) == steps and sorted(a) == sorted(b) and err <= 1e-5 and werr <= 1e-5
    print(f"{'ok  ' if good else 'FAIL'} zero3 {run} matches 1 rank: max rel dloss {err:.1e}, max rel dweight {werr:.1e}")
    ok &= good
# LoRA with expert parallelism (adapters on routed experts too): as the zero2 case above, the adapters may move by
# the summation-order error of 2 ranks without expert parallelism, no more.
a, b = rows("ep_lora_1"), rows("z3_ep_lora")
err = max(abs(a[s] - b[s]) / a[s] for s in a)
ad = lambda run: load_file(f"{W}/{run}/checkpoints/step_00000006/adapter_model.safetensors")
werr, dperr = wdiff(ad("ep_lora_1"), ad("z3_ep_lora")), wdiff(ad("ep_lora_1"), ad("ep_lora_dp"))
good = sorted(a) == sorted(b) and err <= 1e-5 and werr <= max(1e-5, 3 * dperr) and werr <= 1e-4
print(f"{'ok  ' if good else 'FAIL'} zero3 LoRA with E=2 matches 1 rank: max rel dloss {err:.1e}, max rel d adapter "
      f"{werr:.1e} (2 ranks without EP: {dperr:.1e})")
ok &= good
a = rows("z3_4")
for run, steps in [("z3_to_zero2", range(11, 21)), ("z3_to_none", range(16, 21))]:
    got = rows(run)
    err = max(abs(a[s] - got[s]) / a[s] for s in got)
    good = sorted(got) == list(steps) and err <= 1e-5
    print(f"{'ok  ' if good else 'FAIL'} {run} continues the 4-rank zero3 curve: max rel dloss {err:.1e}")
    ok &= good
def memory(run, rank):
    text = open(f"{W}/{run}/logs/rank_{rank}.log").read()
    m = re.findall(r"memory rank \d+: .* bucket_bytes=(\d+) param_bytes=(\d+) gathered_param_peak_bytes=(\d+)", text)
    return tuple(map(int, m[-1]))
_, total, _ = memory("r1", 0)  # the debug model's fp32 parameters, whole
for run, n in [("zero2_2", 2), ("z3_2", 2), ("z3_4", 4)]:
    for rank in range(n):
        unit, params, gathered = memory(run, rank)
        if run.startswith("zero2"):
            good = params == total and gathered == 0
        else:  # 1/N of every unit's buckets (padded to a multiple of N: < 2 x N values per unit) plus two units
            good = 0 <= params - total / n <= 4 * 2 * n * 8 and unit <= gathered <= 2 * unit
        print(f"{'ok  ' if good else 'FAIL'} {run} rank {rank}: parameters {params} B held (whole model {total} B), "
              f"gathered peak {gathered} B (largest unit {unit} B)")
        ok &= good
# LoRA: the frozen base is sharded too (the 1-rank runs hold the base's and the adapters' fp32 bytes whole).
base, adapters = memory("z3_dense_1", 0)[1], memory("z3_lora_1", 0)[1]
for rank in range(2):
    unit, params, gathered = memory("z3_lora_2", rank)
    good = 0 <= params - (base + adapters) / 2 <= 4 * 2 * 2 * 16 and 0 < gathered <= 2 * unit
    print(f"{'ok  ' if good else 'FAIL'} z3_lora_2 rank {rank}: parameters {params} B held (frozen base {base} B + "
          f"adapters {adapters} B whole), gathered peak {gathered} B")
    ok &= good
sys.exit(0 if ok else 1)
PY

# A rank killed while the others train with expert parallelism (mostly inside the all-to-alls): every rank exits,
# non-zero, naming the collective that failed.
next_port
"$LAUNCH" --nproc-per-node 2 --master-port "$port" --grace-s 5 -- "$BIN/dsopen-train" --config "$W/base.yaml" \
  --set run.output_dir="$W/ep_kill" --set parallel.strategy=ddp --set parallel.expert_parallel=2 \
  --set parallel.timeout_s=30 --set train.max_steps=100000 --set checkpoint.every=0 --set run.log_every=50 \
  > "$W/ep_kill.log" 2>&1 &
launcher=$!
for _ in $(seq 1 600); do grep -q "step 1/" "$W/ep_kill/logs/rank_0.log" 2>/dev/null && break; sleep 0.1; done
if ! kill_rank1 ep_kill "$launcher"; then echo "FAIL ep kill: rank 1 not found"; fail=1; else
  # Which collective rank 0 is in when the peer dies is a race (the all-to-alls, or a gradient bucket's all-reduce);
  # the message must name the one that failed and the group.
  said="$(grep -oE 'error: parallel: gloo (all_to_all|all_reduce|reduce_scatter|all_gather|broadcast) over 2 ranks failed' \
    "$W/ep_kill.log" | head -1)"
  if [ $rc = 0 ] || [ "$took" -gt 40 ] || [ "$left" != 0 ] || [ -z "$said" ]; then
    echo "FAIL ep kill: launcher exit $rc after ${took}s, $left processes left"; tail -5 "$W/ep_kill.log"; fail=1
  else
    echo "ok   SIGKILL of rank 1 under expert parallelism: exit $rc after ${took}s, no rank left; rank 0: $said"
  fi
fi

# Gradient accumulation across ranks is exact for every loss term: SFT rows hold different numbers of targets (and
# MTP targets), and 2 ranks x 2 micro-batches must match 1 rank x 4 with MTP, z-loss, aux loss and bias updates on.
python3 - "$W/chat.jsonl" <<'PY'
import json, sys
lines = [l.strip() for l in open("/usr/share/games/fortunes/fortunes", errors="replace") if len(l.strip()) >= 20][:64]
with open(sys.argv[1], "w") as f:
    for i, l in enumerate(lines):
        f.write(json.dumps({"messages": [{"role": "user", "content": "Say something wise." * (1 + i % 3)},
                                         {"role": "assistant", "content": l}]}) + "\n")
PY
cat > "$W/sft.yaml" <<YAML
base: $W/base.yaml
model: {use_mtp: true, z_loss_coef: 1.0e-3, aux_loss_alpha: 0.01, bias_update_speed: 0.01}
tokenizer:
  path: $W/chat_tok.model
  train: {inputs: [/usr/share/games/fortunes/fortunes], vocab_size: 512, character_coverage: 0.999,
          user_symbols: ["<|System|>", "<|User|>", "<|Assistant|>", "<|end|>"]}
data: {format: sft, train: [$W/chat.jsonl], seq_len: 48}
# eps 1e-6: Adam divides by sqrt(v) + eps, which turns the last-bit differences of a gradient summed in another order
# (ranks, then micro-batches) into 1e-5-sized weight differences where the gradient is ~1e-8 and 1e-8 is the eps.
train: {max_steps: 3, warmup_steps: 0, micro_batch_size: 1, eps: 1.0e-6}
checkpoint: {every: 0}
YAML
CONFIG="$W/sft.yaml" train sft_1 1 none 4
CONFIG="$W/sft.yaml" train sft_2 2 zero2 2
python3 - "$W" <<'PY' || fail=1
import json, sys
from safetensors.torch import load_file
W = sys.argv[1]
def rows(run):
    return {j["step"]: j for j in map(json.loads, open(f"{W}/{run}/metrics.jsonl")) if "loss" in j}
a, b = rows("sft_1"), rows("sft_2")
assert sorted(a) == [1, 2, 3], sorted(a)
err = max(abs(a[s][k] - b[s][k]) for s in a for k in ("loss", "moe_aux_loss", "mtp_loss", "z_loss", "grad_norm"))
last = lambda run: open(f"{W}/{run}/checkpoints/latest").read().strip()
wa = load_file(f"{W}/sft_1/checkpoints/{last('sft_1')}/model.safetensors")
wb = load_file(f"{W}/sft_2/checkpoints/{last('sft_2')}/model.safetensors")
werr = max((wa[k] - wb[k]).abs().max().item() for k in wa)
ok = err <= 1e-6 and werr <= 1e-6 and wa.keys() == wb.keys()
print(f"{'ok  ' if ok else 'FAIL'} SFT 2 ranks x 2 == 1 rank x 4 with every loss term on: "
      f"max |dmetric| = {err:.2e}, max |dweight| = {werr:.2e}")
sys.exit(0 if ok else 1)
PY

# SIGKILL one rank of a long run: every rank must be gone within 60 s, the launcher exit non-zero, and the last
# checkpoint must be intact and resumable.
next_port
"$LAUNCH" --nproc-per-node 2 --master-port "$port" --grace-s 5 -- "$BIN/dsopen-train" --config "$W/base.yaml" \
  --set run.output_dir="$W/kill" --set parallel.strategy=zero2 --set train.max_steps=100000 \
  --set checkpoint.every=5 --set run.log_every=50 > "$W/kill.log" 2>&1 &
launcher=$!
for _ in $(seq 1 600); do [ -f "$W/kill/checkpoints/latest" ] && break; sleep 0.1; done
if ! kill_rank1 kill "$launcher"; then echo "FAIL kill: rank 1 not found"; fail=1; else
  if [ $rc = 0 ] || [ "$took" -gt 60 ] || [ "$left" != 0 ]; then
    echo "FAIL kill: launcher exit $rc after ${took}s, $left processes left"; tail -5 "$W/kill.log"; fail=1
  else
    echo "ok   SIGKILL of rank 1: launcher exit $rc after ${took}s, no rank left"
  fi
  train kill_resume 1 none 8 --set run.output_dir="$W/kill" --set checkpoint.resume=auto \
    --set train.max_steps=$(( $(sed 's/step_0*//' "$W/kill/checkpoints/latest") + 2 ))
fi

# Ctrl-C/SIGTERM to the launcher: every rank checkpoints after the same step and exits 0.
next_port
"$LAUNCH" --nproc-per-node 2 --master-port "$port" -- "$BIN/dsopen-train" --config "$W/base.yaml" \
  --set run.output_dir="$W/term" --set parallel.strategy=zero1 --set train.max_steps=100000 \
  --set checkpoint.every=0 --set run.log_every=50 > "$W/term.log" 2>&1 &
launcher=$!
for _ in $(seq 1 600); do grep -q "step 1/" "$W/term/logs/rank_0.log" 2>/dev/null && break; sleep 0.1; done
kill -TERM "$launcher"
wait "$launcher"; rc=$?
files="$(ls "$W"/term/checkpoints/step_*/optimizer/ 2>/dev/null | tr '\n' ' ')"
if [ $rc = 0 ] && [ "$files" = "rank_0.safetensors rank_1.safetensors " ] && grep -q "stopping on signal" "$W/term/logs/rank_1.log"; then
  echo "ok   SIGTERM to the launcher: exit 0, both ranks saved one checkpoint ($files)"
else
  echo "FAIL SIGTERM to the launcher: exit $rc, optimizer files '$files'"; tail -n 5 "$W/term.log"; fail=1
fi

# Launcher usage errors.
"$LAUNCH" --nproc-per-node 0 -- true 2>/dev/null; [ $? = 2 ] && echo "ok   launcher rejects --nproc-per-node 0" || { echo "FAIL launcher bad arg"; fail=1; }
"$LAUNCH" --nproc-per-node 2 2>/dev/null; [ $? = 2 ] && echo "ok   launcher needs a command" || { echo "FAIL launcher no command"; fail=1; }
next_port
"$LAUNCH" --nproc-per-node 2 --master-port "$port" -- bash -c '[ "$RANK" = 1 ] && exit 7; sleep 30' 2>/dev/null
rc=$?; [ $rc = 7 ] && echo "ok   launcher exits with the failing rank's code" || { echo "FAIL launcher code $rc"; fail=1; }

# Ranks started with different configs (here: rank 1 another learning rate) refuse to train together.
next_port
"$LAUNCH" --nproc-per-node 2 --master-port "$port" -- bash -c \
  "exec \"$BIN/dsopen-train\" --config \"$W/base.yaml\" --set run.output_dir=\"$W/mismatch\" --set train.max_steps=2 \
   --set train.lr=\$([ \"\$RANK\" = 1 ] && echo 1.0e-3 || echo 2.0e-3)" > "$W/mismatch.log" 2>&1
rc=$?
if [ $rc = 2 ] && grep -q "resolved config differs from rank 0's at '.*lr: 1.0e-3" "$W/mismatch.log" && [ ! -d "$W/mismatch/checkpoints" ]; then
  echo "ok   ranks with different configs: exit 2 before training, naming the line: $(grep -o "differs from rank 0's at .*" "$W/mismatch.log" | head -1 | cut -c1-120)"
else
  echo "FAIL ranks with different configs: exit $rc"; tail -n 5 "$W/mismatch.log"; fail=1
fi
exit $fail
