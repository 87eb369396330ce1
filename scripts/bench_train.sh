#!/usr/bin/env bash
# Training throughput, side by side in one run: dsopen (C++) vs the same model in PyTorch (Python, same torch).
# Usage: scripts/bench_train.sh [CONFIG ...]   (default: configs/bench/dense-125m.yaml configs/bench/moe-small.yaml)
# Env: BATCH (4), SEQ (256), STEPS (3), THREADS (nproc), PRECISIONS ("fp32 bf16"), DEVICE (cpu | cuda).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/build/bin"
BATCH="${BATCH:-4}" SEQ="${SEQ:-256}" STEPS="${STEPS:-3}" THREADS="${THREADS:-$(nproc)}"
PRECISIONS="${PRECISIONS:-fp32 bf16}" DEVICE="${DEVICE:-cpu}"
CONFIGS=("$@")
[ ${#CONFIGS[@]} -eq 0 ] && CONFIGS=("$ROOT/configs/bench/dense-125m.yaml" "$ROOT/configs/bench/moe-small.yaml")
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
printf "%-28s %-5s %12s %12s %12s %8s\n" config prec "dsopen tok/s" "torch tok/s" "dsopen ms" ratio
for cfg in "${CONFIGS[@]}"; do
  "$BIN/dsopen-model-info" --config "$cfg" --hf-config "$TMP/config.json" >/dev/null
  for prec in $PRECISIONS; do
    ours=$("$BIN/dsopen-bench-model" --config "$cfg" --batch "$BATCH" --seq-len "$SEQ" --steps "$STEPS" \
      --precision "$prec" --threads "$THREADS" --device "$DEVICE" --optimizer --json)
    ref=$(python3 "$ROOT/bench/torch_reference.py" "$TMP" --batch "$BATCH" --seq-len "$SEQ" --steps "$STEPS" \
      --precision "$prec" --threads "$THREADS" --device "$DEVICE" 2>/dev/null | tail -n 1)
    python3 - "$cfg" "$prec" "$ours" "$ref" <<'PY'
import json, os, sys
cfg, prec, ours, ref = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
print(f"{os.path.basename(cfg):28s} {prec:5s} {ours['tokens_per_s']:12.0f} {ref['tokens_per_s']:12.0f} "
      f"{ours['ms_per_step']:12.0f} {ours['tokens_per_s'] / ref['tokens_per_s']:8.2f}")
PY
  done
done
