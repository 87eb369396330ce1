#!/usr/bin/env bash
# Two builds side by side in one run: the same benchmarks with binaries A and B, alternating, each ROUNDS times,
# medians reported. For checking that a change leaves speed where it was (or measuring what it bought):
#   git worktree add /tmp/old OLD_COMMIT && (cd /tmp/old && scripts/setup.sh)   # or any build of the old commit
#   scripts/bench_ab.sh /tmp/old/build/bin build/bin
# Measured: a training step of configs/bench/*.yaml (dsopen-bench-model --optimizer, fp32 and bf16), dsopen-train on
# the default job's model (tokens/s of steps 2-12), and greedy decoding (tokens/s, batch 1, 64 + 64 tokens) of the
# tiny model and a random 125M dense model in fp32 and int4.
# Env: ROUNDS (3), THREADS (nproc), WORK (runs/bench-ab).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
A="$(cd "$1" && pwd)" B="$(cd "$2" && pwd)"
ROUNDS="${ROUNDS:-3}" THREADS="${THREADS:-$(nproc)}" WORK="${WORK:-$ROOT/runs/bench-ab}"
mkdir -p "$WORK"
cd "$ROOT"

# Models for decoding: a tiny checkpoint trained for 12 steps by B, a random 125M dense model, their int4 files.
if [ ! -f "$WORK/tiny/checkpoints/latest" ]; then
  "$B/dsopen-train" --config configs/tiny.yaml --set train.max_steps=12 --set run.output_dir="$WORK/tiny" \
    --set checkpoint.dir="$WORK/tiny/checkpoints" >/dev/null 2>&1
fi
TINY="$WORK/tiny/checkpoints/$(cat "$WORK/tiny/checkpoints/latest")"
DENSE="$WORK/dense-125m"
if [ ! -f "$DENSE/model.safetensors" ]; then
  mkdir -p "$DENSE"
  "$B/dsopen-model-info" --config configs/bench/dense-125m.yaml --hf-config "$DENSE/config.json" >/dev/null
  python3 - "$DENSE" 2>/dev/null <<'PY'
import sys, torch, transformers
torch.manual_seed(0)
m = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(sys.argv[1]))
m.save_pretrained(sys.argv[1])
PY
fi
for m in tiny dense; do
  src=$([ $m = tiny ] && echo "$TINY" || echo "$DENSE"); g=$([ $m = tiny ] && echo 32 || echo 128)
  [ -f "$WORK/$m-int4/model.safetensors" ] ||
    "$B/dsopen-quantize" --model "$src" --method rtn-int4 --group-size $g --out "$WORK/$m-int4" >/dev/null
done
IDS="$(python3 -c 'print(",".join(str(5 + 37 * i % 7000) for i in range(64)))')"

bench_step() {  # BIN CONFIG PRECISION -> tokens/s
  "$1/dsopen-bench-model" --config "$2" --batch 4 --seq-len 256 --steps 3 --precision "$3" --threads "$THREADS" \
    --optimizer --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_s"])'
}
bench_train() {  # BIN -> tokens/s of steps 2..12 of the default job's model
  local out="$WORK/train-$RANDOM"
  "$1/dsopen-train" --config configs/tiny.yaml --set train.max_steps=12 --set run.output_dir="$out" \
    --set checkpoint.dir="$out/ck" --set checkpoint.every=0 --set train.eval_every=0 --set run.log_every=11 \
    --set data.valid_fraction=0 >/dev/null 2>&1 || true
  python3 -c 'import json,sys; r=[json.loads(l) for l in open(sys.argv[1]) if "loss" in l]; print(r[-1]["tokens_per_s"])' \
    "$out/metrics.jsonl"
  rm -rf "$out"
}
bench_decode() {  # BIN MODEL_DIR TOKENIZER_DIR -> decode tokens/s
  "$1/dsopen-generate" --model "$2" --tokenizer "$3" --prompt-ids "$IDS" --max-new-tokens 64 --ignore-eos \
    --temperature 0 --no-bos --warmup 1 --repeat 3 --threads "$THREADS" --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["decode_tokens_per_s"])'
}

declare -A CASES=(
  ["train-step dense-125m fp32"]="bench_step BIN configs/bench/dense-125m.yaml fp32"
  ["train-step dense-125m bf16"]="bench_step BIN configs/bench/dense-125m.yaml bf16"
  ["train-step moe-small fp32"]="bench_step BIN configs/bench/moe-small.yaml fp32"
  ["train-step moe-small bf16"]="bench_step BIN configs/bench/moe-small.yaml bf16"
  ["dsopen-train tiny"]="bench_train BIN"
  ["decode tiny fp32"]="bench_decode BIN $TINY $TINY"
  ["decode tiny int4"]="bench_decode BIN $WORK/tiny-int4 $TINY"
  ["decode dense-125m fp32"]="bench_decode BIN $DENSE $TINY"
  ["decode dense-125m int4"]="bench_decode BIN $WORK/dense-int4 $TINY"
)
printf "%-28s %12s %12s %7s   (tokens/s, median of %s alternating runs)\n" case A B "B/A" "$ROUNDS"
for name in "train-step dense-125m fp32" "train-step dense-125m bf16" "train-step moe-small fp32" \
            "train-step moe-small bf16" "dsopen-train tiny" "decode tiny fp32" "decode tiny int4" \
            "decode dense-125m fp32" "decode dense-125m int4"; do
  a=() b=()
  for _ in $(seq "$ROUNDS"); do
    a+=("$(${CASES[$name]//BIN/$A})")
    b+=("$(${CASES[$name]//BIN/$B})")
  done
  python3 - "$name" "${a[*]}" "${b[*]}" <<'PY'
import statistics, sys
name, a, b = sys.argv[1], list(map(float, sys.argv[2].split())), list(map(float, sys.argv[3].split()))
ma, mb = statistics.median(a), statistics.median(b)
print(f"{name:28s} {ma:12.1f} {mb:12.1f} {mb / ma:7.3f}   A {[round(x) for x in a]} B {[round(x) for x in b]}")
PY
done
