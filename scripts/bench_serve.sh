#!/usr/bin/env bash
# Serving throughput and latency of dsopen-serve, side by side in one run (docs/BENCHMARKS.md):
#   - 32 concurrent streaming clients for DURATION seconds (continuous batching), prompts of mixed lengths;
#   - the same requests one at a time (one client);
#   - transformers `generate` called per request, one at a time, same model and threads (bench/serve_reference.py).
# Two request mixes: "long" prompts of 8-200 words, "chat" prompts of 8-48 words; outputs 32-128 tokens, greedy,
# EOS ignored. The server's resident memory is sampled after the warm-up and at the end (growth = a leak).
# Usage: scripts/bench_serve.sh     (run it under `flock /tmp/dsopen-build.lock` so no build interferes)
# Env: MODEL (runs/tiny/checkpoints/latest) DURATION (60) SEQ_DURATION (30) CLIENTS (32) THREADS (dsopen-serve's
#      default) MIXES ("long chat") RESULTS (runs/bench-serve/results.jsonl)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/build/bin"
CKPT="$ROOT/runs/tiny/checkpoints"
if [ -z "${MODEL:-}" ]; then
  [ -f "$CKPT/latest" ] || { echo "no $CKPT/latest: run build/bin/dsopen-train --config configs/tiny.yaml" >&2; exit 2; }
  MODEL="$CKPT/$(cat "$CKPT/latest")"
fi
DURATION="${DURATION:-60}" SEQ_DURATION="${SEQ_DURATION:-30}" CLIENTS="${CLIENTS:-32}" MIXES="${MIXES:-long chat}"
WORK="$ROOT/runs/bench-serve"
RESULTS="${RESULTS:-$WORK/results.jsonl}"
mkdir -p "$WORK"
: >"$RESULTS"
THREAD_ARGS=()
[ -n "${THREADS:-}" ] && THREAD_ARGS=(--threads "$THREADS")

"$BIN/dsopen-serve" --model "$MODEL" --port 0 --served-model-name bench "${THREAD_ARGS[@]}" >"$WORK/serve.out" 2>"$WORK/serve.err" &
SERVER=$!
trap 'kill -INT $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "^listening on" "$WORK/serve.out" 2>/dev/null && break; sleep 0.1; done
URL="$(awk '/^listening on/ {print $3}' "$WORK/serve.out")"
[ -n "$URL" ] || { cat "$WORK/serve.err" >&2; exit 1; }
MODEL_THREADS="$(grep -o 'model threads [0-9]*' "$WORK/serve.err" | grep -o '[0-9]*$' || true)"

mix_args() { case "$1" in long) echo "--min-prompt 8 --max-prompt 200" ;; chat) echo "--min-prompt 8 --max-prompt 48" ;; esac; }
run_load() {  # MIX CLIENTS SECONDS
  python3 "$ROOT/bench/serve_load.py" --url "$URL" --model bench --clients "$2" --duration "$3" --warmup 5 \
    --server-pid "$SERVER" $(mix_args "$1") | python3 -c "import json,sys; d=json.load(sys.stdin); d['mix']='$1'; d['impl']='dsopen-serve'; print(json.dumps(d))"
}

printf "%-5s %-32s %8s %6s %9s %10s %10s %10s %10s %12s\n" mix impl requests errors "tok/s" "TTFT p50" "TTFT p99" \
  "ITL p50" "ITL p99" "RSS MB"
for mix in $MIXES; do
  for c in "$CLIENTS" 1; do
    secs=$([ "$c" = 1 ] && echo "$SEQ_DURATION" || echo "$DURATION")
    line="$(run_load "$mix" "$c" "$secs")"
    echo "$line" >>"$RESULTS"
    python3 - "$line" <<'PY'
import json, sys
d = json.loads(sys.argv[1])
name = f"dsopen-serve, {d['clients']} client{'s' if d['clients'] > 1 else ''}"
rss = f"{d['server_rss_mb_after_warmup']:.0f}->{d['server_rss_mb_end']:.0f}" if d["server_rss_mb_end"] else "-"
print(f"{d['mix']:5s} {name:32s} {d['requests']:8d} {d['errors']:6d} {d['output_tokens_per_s']:9.1f} "
      f"{d['ttft_p50_ms']:10.1f} {d['ttft_p99_ms']:10.1f} {d['itl_p50_ms']:10.1f} {d['itl_p99_ms']:10.1f} {rss:>12s}")
PY
  done
done
kill -INT $SERVER; wait $SERVER || true
trap - EXIT

for mix in $MIXES; do
  line="$(python3 "$ROOT/bench/serve_reference.py" --model "$MODEL" --duration "$SEQ_DURATION" \
            ${MODEL_THREADS:+--threads "$MODEL_THREADS"} $(mix_args "$mix") 2>/dev/null | tail -1)"
  echo "$line" | python3 -c "import json,sys; d=json.load(sys.stdin); d['mix']='$mix'; print(json.dumps(d))" >>"$RESULTS"
  python3 - "$line" "$mix" <<'PY'
import json, sys
d = json.loads(sys.argv[1])
print(f"{sys.argv[2]:5s} {'transformers generate, 1 at a time':32s} {d['requests']:8d} {0:6d} {d['output_tokens_per_s']:9.1f} "
      f"{'-':>10s} {'-':>10s} {'-':>10s} {'-':>10s} {'-':>12s}   (latency p50 {d['latency_p50_ms']} ms)")
PY
done
echo "results: $RESULTS"
