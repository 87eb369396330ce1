#!/usr/bin/env bash
# Training throughput, side by side in one run: dsopen (C++) against the same model in PyTorch eager and under
# torch.compile (Python, same torch, same thread count, same batch), with each process's peak RSS.
# Usage: scripts/bench_train.sh [CONFIG ...]
#   default: configs/tiny.yaml (MTP on: dsopen only, transformers has no MTP), the same without MTP,
#            configs/bench/dense-125m.yaml, configs/bench/moe-small.yaml
# Env: BATCH (8), SEQ (256), STEPS (3), THREADS (nproc), PRECISIONS ("fp32 bf16"), DEVICE (cpu | cuda),
#      COMPILE (1; 0 skips torch.compile), TABLE (also write the markdown table to this file),
#      REF_MALLOC (a malloc library LD_PRELOADed into the PyTorch runs, e.g. the tcmalloc our binaries link).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/build/bin"
BATCH="${BATCH:-8}" SEQ="${SEQ:-256}" STEPS="${STEPS:-3}" THREADS="${THREADS:-$(nproc)}"
PRECISIONS="${PRECISIONS:-fp32 bf16}" DEVICE="${DEVICE:-cpu}" COMPILE="${COMPILE:-1}" TABLE="${TABLE:-}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
CONFIGS=("$@")
if [ ${#CONFIGS[@]} -eq 0 ]; then
  printf 'base: %s\nmodel: {use_mtp: false}\n' "$ROOT/configs/tiny.yaml" > "$TMP/tiny-no-mtp.yaml"
  CONFIGS=("$ROOT/configs/tiny.yaml" "$TMP/tiny-no-mtp.yaml" "$ROOT/configs/bench/dense-125m.yaml"
           "$ROOT/configs/bench/moe-small.yaml")
fi
lscpu | sed -n 's/^Model name: *//p' | head -1 > "$TMP/cpu"
FLAGS=$(grep -o -w -E 'avx512f|avx512_bf16|amx_bf16|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')
{
  echo "CPU: $(cat "$TMP/cpu"), flags: ${FLAGS}; threads $THREADS; batch $BATCH x $SEQ tokens; torch $(python3 -c 'import torch; print(torch.__version__)')"
  echo
  echo "| config | precision | dsopen tok/s | eager tok/s | compile tok/s | vs eager | vs compile | RSS dsopen / eager / compile (MB) |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
} | tee "$TMP/table.md"

# ours|eager|compile -> a JSON line (tokens_per_s, peak_rss_mb), or {} when it cannot run
run_ours() {
  local cfg=$1 prec=$2
  /usr/bin/time -f "%M" -o "$TMP/rss" "$BIN/dsopen-bench-model" --config "$cfg" --batch "$BATCH" --seq-len "$SEQ" \
    --steps "$STEPS" --precision "$prec" --threads "$THREADS" --device "$DEVICE" --optimizer --json 2>/dev/null |
    python3 -c "import json,sys; d=json.loads(sys.stdin.read()); d['peak_rss_mb']=int(open('$TMP/rss').read().split()[-1])/1024; print(json.dumps(d))"
}
run_ref() {
  local prec=$1; shift
 LD_PRELOAD="${REF_MALLOC:-}" python3 "$ROOT/bench/torch_reference.py" "$TMP" --batch "$BATCH" --seq-len "$SEQ" --steps "$STEPS" \
    --precision "$prec" --threads "$THREADS" --device "$DEVICE" "$@" 2>/dev/null | tail -n 1 || echo '{}'
}

for cfg in "${CONFIGS[@]}"; do
  "$BIN/dsopen-model-info" --config "$cfg" --hf-config "$TMP/config.json" >/dev/null
  name="$(basename "$cfg" .yaml)"
  mtp=0
  "$BIN/dsopen-model-info" --config "$cfg" | grep -q '^MTP parameters.*(included)' && mtp=1
  [ "$mtp" = 1 ] && name="$name (MTP on)"
  for prec in $PRECISIONS; do
    ours=$(run_ours "$cfg" "$prec")
    eager='{}' compiled='{}'
    if [ "$mtp" = 0 ]; then
      eager=$(run_ref "$prec")
      [ "$COMPILE" = 1 ] && compiled=$(run_ref "$prec" --compile)
    fi
    python3 - "$name" "$prec" "$ours" "$eager" "$compiled" <<'PY' | tee -a "$TMP/table.md"
import json, sys
name, prec = sys.argv[1], sys.argv[2]
ours, eager, comp = (json.loads(x or "{}") for x in sys.argv[3:6])
def tok(d): return f"{d['tokens_per_s']:.0f}" if "tokens_per_s" in d else "—"
def ratio(d): return f"{ours['tokens_per_s'] / d['tokens_per_s']:.2f}" if "tokens_per_s" in d else "—"
def rss(d): return f"{d['peak_rss_mb']:.0f}" if "peak_rss_mb" in d else "—"
print(f"| {name} | {prec} | {tok(ours)} | {tok(eager)} | {tok(comp)} | {ratio(eager)} | {ratio(comp)} | "
      f"{rss(ours)} / {rss(eager)} / {rss(comp)} |")
PY
  done
done
[ -n "$TABLE" ] && cp "$TMP/table.md" "$TABLE"
exit 0
