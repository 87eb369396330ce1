#!/usr/bin/env bash
# Generation throughput, side by side in one run: dsopen-generate (C++) vs transformers `generate` (Python, same
# torch) on the same model directories, the same prompt token ids, greedy, EOS ignored, fixed lengths.
# Models: the default job's tiny checkpoint (runs/tiny/checkpoints/latest) and a randomly initialised
# configs/bench/dense-125m.yaml model, each in fp32, bf16, and rtn-int8 (per channel) / rtn-int4 files from
# dsopen-quantize. int8 and int4 keep their codes and run LibTorch's weight-only CPU kernels on both sides
# (bench/generate_reference.py swaps transformers' nn.Linear layers for the same kernels); int4-deq is the int4
# file dequantized to fp32 on both sides (dsopen-generate --dequantize).
# Usage: scripts/bench_generate.sh        (run it under `flock /tmp/dsopen-build.lock` so no build interferes)
# Env: PROMPT (64) NEW (64) BATCHES ("1 8") PRECISIONS ("fp32 bf16 int8 int4 int4-deq") MODELS ("tiny dense-125m")
#      WARMUP (1) REPEAT (3) ROUNDS (2): each side runs ROUNDS processes (alternating with the other side) of WARMUP
#      untimed and REPEAT timed generations; the fastest prefill and the fastest decode count. THREADS (nproc)
#      WORK (runs/bench-generate: the 125M model and the quantized files are kept there) RESULTS (JSON lines file)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/build/bin"
PROMPT="${PROMPT:-64}" NEW="${NEW:-64}" BATCHES="${BATCHES:-1 8}" PRECISIONS="${PRECISIONS:-fp32 bf16 int8 int4 int4-deq}"
MODELS="${MODELS:-tiny dense-125m}" WARMUP="${WARMUP:-1}" REPEAT="${REPEAT:-3}" ROUNDS="${ROUNDS:-2}"
THREADS="${THREADS:-$(nproc)}"
WORK="${WORK:-$ROOT/runs/bench-generate}"
RESULTS="${RESULTS:-$WORK/results.jsonl}"
mkdir -p "$WORK"
: >"$RESULTS"

TINY_CKPT="$ROOT/runs/tiny/checkpoints"
[ -f "$TINY_CKPT/latest" ] || { echo "no $TINY_CKPT/latest: run build/bin/dsopen-train --config configs/tiny.yaml" >&2; exit 2; }
TINY="$TINY_CKPT/$(cat "$TINY_CKPT/latest")"
TOKENIZER="$TINY/tokenizer.model"  # 8000 pieces; prompts use ids below 8000 so they fit both vocabularies

# The 125M model: config.json from dsopen-model-info, random weights saved by transformers (seeded).
DENSE="$WORK/dense-125m"
if [[ " $MODELS " == *" dense-125m "* && ! -f "$DENSE/model.safetensors" ]]; then
  mkdir -p "$DENSE"
  "$BIN/dsopen-model-info" --config "$ROOT/configs/bench/dense-125m.yaml" --hf-config "$DENSE/config.json" >/dev/null
  python3 - "$DENSE" 2>"$WORK/setup.log" <<'PY' || { cat "$WORK/setup.log" >&2; exit 1; }
import sys, torch, transformers
torch.manual_seed(0)
d = sys.argv[1]
m = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(d))
m.save_pretrained(d)
PY
fi

model_dir() {  # MODEL PRECISION -> directory
  local base group
  case "$1" in tiny) base="$TINY" group=32 ;; dense-125m) base="$DENSE" group=128 ;; esac
  case "$2" in
    fp32 | bf16) echo "$base" ;;
    int8 | int4 | int4-deq)
      local bits="${2%-deq}" out
      [ "$bits" = int8 ] && group=-1  # per-channel: the int8 kernel's layout
      out="$WORK/$1-rtn-$bits-g$group"
      [ -f "$out/model.safetensors" ] ||
        "$BIN/dsopen-quantize" --model "$base" --method "rtn-$bits" --group-size "$group" --out "$out" >/dev/null
      echo "$out" ;;
  esac
}

printf "%-10s %-8s %3s | %14s %14s | %14s %14s %7s | %s\n" model prec B "prefill dsopen" "prefill HF" \
  "decode dsopen" "decode HF" ratio "same tokens"
for model in $MODELS; do
  for prec in $PRECISIONS; do
    dir="$(model_dir "$model" "$prec")"
    dtype=fp32 deq=()
    [ "$prec" = bf16 ] && dtype=bf16
    [ "$prec" = int4-deq ] && deq=(--dequantize)
    for B in $BATCHES; do
      prompts="$WORK/prompts-b$B.txt"
      python3 -c "
import random
r = random.Random(1234)
for b in range($B): print(' '.join(str(r.randrange(3, 8000)) for _ in range($PROMPT)))" >"$prompts"
      args=()
      while read -r line; do args+=(--prompt-ids "$line"); done <"$prompts"
      # ROUNDS alternating processes per side: on a shared 2-vCPU VM one process's figures swing by 25%.
      ours_all=() ref_all=()
      for _ in $(seq "$ROUNDS"); do
        ours_all+=("$("$BIN/dsopen-generate" --model "$dir" --tokenizer "$TOKENIZER" "${args[@]}" --no-bos --ignore-eos \
          --max-new-tokens "$NEW" --temperature 0 --top-k 0 --top-p 1 --repetition-penalty 1 --dtype "$dtype" \
          --threads "$THREADS" --warmup "$WARMUP" --repeat "$REPEAT" "${deq[@]}" --json)")
        ref=$(python3 "$ROOT/bench/generate_reference.py" "$dir" --prompt-ids-file "$prompts" --new-tokens "$NEW" \
          --dtype "$dtype" --threads "$THREADS" --warmup "$WARMUP" --repeat "$REPEAT" "${deq[@]}" 2>"$WORK/reference.log") ||
          { cat "$WORK/reference.log" >&2; exit 1; }
        ref_all+=("${ref##*$'\n'}")  # the JSON line: transformers may print before it
      done
      python3 - "$model" "$prec" "$RESULTS" "${ours_all[@]}" "${ref_all[@]}" <<'PY'
import json, sys
model, prec, results = sys.argv[1:4]
runs = [json.loads(x) for x in sys.argv[4:]]
ours_all, ref_all = runs[: len(runs) // 2], runs[len(runs) // 2 :]
with open(results, "a") as f:
    for r in runs:
        f.write(json.dumps({"model": model, "precision": prec, **{k: v for k, v in r.items() if k != "tokens"}}) + "\n")
def best(rs, key):
    return max(r[key] for r in rs)
ours, ref = ours_all[0], ref_all[0]
same = sum(a == b for a, b in zip(ours["tokens"], ref["tokens"]))
po, pr = best(ours_all, "prefill_tokens_per_s"), best(ref_all, "prefill_tokens_per_s")
do, dr = best(ours_all, "decode_tokens_per_s"), best(ref_all, "decode_tokens_per_s")
print(f"{model:10s} {prec:8s} {ours['batch']:3d} | {po:14.0f} {pr:14.0f} | {do:14.1f} {dr:14.1f} {do / dr:7.2f} | {same}/{ours['batch']}")
PY
    done
  done
done
echo "prompt $PROMPT tokens, $NEW new tokens, $THREADS threads, best of $ROUNDS x $REPEAT runs; tokens/s summed over the batch; JSON: $RESULTS"
