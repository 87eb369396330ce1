#!/usr/bin/env bash
# Data-parallel throughput: step time, tokens/s and the share of the step spent blocked on collectives, for
# 1, 2 and 4 ranks (scripts/launch.sh, Gloo on the CPU) at one global batch, ddp and zero2; with EXPERT="1 2 4" also
# expert parallelism (MoE configs): the share of the step in expert all-to-alls and the token copies each rank's
# experts received per step (min-max over ranks).
# Usage: scripts/bench_dist.sh [CONFIG]   (default configs/tiny.yaml; its tokenizer and shards must exist — run it once)
# Env: STEPS (12), MICRO (2), GLOBAL_MICRO (8: micro-batches per step over all ranks), RANKS ("1 2 4"),
#      STRATEGIES ("ddp zero2"), EXPERT ("1": expert_parallel values; one that does not divide the ranks is skipped),
#      SET (more --set arguments, e.g. "--set train.precision=fp32").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/build/bin"
CONFIG="${1:-$ROOT/configs/tiny.yaml}"
STEPS="${STEPS:-12}" MICRO="${MICRO:-2}" GLOBAL_MICRO="${GLOBAL_MICRO:-8}"
RANKS="${RANKS:-1 2 4}" STRATEGIES="${STRATEGIES:-ddp zero2}" EXPERT="${EXPERT:-1}" SET="${SET:-}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "config $(basename "$CONFIG"), $STEPS steps, global batch $GLOBAL_MICRO x $MICRO sequences, $(nproc) cores"
printf "%-8s %5s %3s %12s %10s %12s %11s %17s\n" strategy ranks E "step (ms)" "tok/s" "comm share" "a2a share" "expert rows/rank"
port=$((30000 + RANDOM % 10000))
for strategy in $STRATEGIES; do
  for n in $RANKS; do
    for e in $EXPERT; do
      [ "$strategy" != ddp ] && [ "$n" = 1 ] && continue  # one rank: every strategy is the same step
      [ $((n % e)) != 0 ] && continue
      port=$((port + 3))
      run="$strategy$n-$e"
      # shellcheck disable=SC2086
      "$ROOT/scripts/launch.sh" --nproc-per-node "$n" --master-port "$port" -- "$BIN/dsopen-train" --config "$CONFIG" \
        --set run.output_dir="$TMP/$run" --set parallel.strategy="$strategy" --set train.max_steps="$STEPS" \
        --set parallel.expert_parallel="$e" --set train.micro_batch_size="$MICRO" \
        --set train.grad_accum_steps=$((GLOBAL_MICRO / n)) $SET \
        --set run.log_every=1 --set train.eval_every=0 --set checkpoint.every=0 --set checkpoint.resume=none \
        --set checkpoint.dir="$TMP/ck$run" > "$TMP/$run.log" 2>&1 || { tail -n 5 "$TMP/$run.log"; exit 1; }
      python3 - "$TMP/$run/metrics.jsonl" "$strategy" "$n" "$e" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rows = [r for r in rows if "loss" in r][2:]  # the first steps warm up allocators and connections
# Medians: one step disturbed by another process on the machine must not move the figure.
step = statistics.median(r["step_time_s"] for r in rows)
tokens = rows[-1]["tokens"] / rows[-1]["step"]
comm = statistics.median(r.get("comm_wait_s", 0.0) / r["step_time_s"] for r in rows)
a2a = statistics.median(r.get("all_to_all_share", 0.0) for r in rows)
per_rank = rows[-1].get("ep_tokens_per_rank")
spread = f"{min(per_rank):.0f}-{max(per_rank):.0f}" if per_rank else "-"
print(f"{sys.argv[2]:8s} {sys.argv[3]:>5s} {sys.argv[4]:>3s} {1000 * step:12.0f} {tokens / step:10.0f} {100 * comm:11.0f}% "
      f"{100 * a2a:10.0f}% {spread:>17s}")
PY
    done
  done
done
