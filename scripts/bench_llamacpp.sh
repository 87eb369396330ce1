#!/usr/bin/env bash
# Our GGUF files in llama.cpp itself: dsopen-convert --format gguf writes the default job's checkpoint in each type,
# llama.cpp (built from the copy on PyPI, scripts/build_llamacpp.sh) tokenizes the prompts (compared with our ids)
# and decodes greedily from our prompt ids (bench/llamacpp_greedy.cpp: argmax per step, EOS not suppressed, as
# dsopen-generate --temperature 0 --ignore-eos). Reported: how many of the NEW tokens per prompt agree, and where
# they part, llama.cpp's gap between its two best logits there (a near-tie flipped by rounding, not a bug: quantized
# types part earlier). Then llama-bench's prefill and decode tokens/s per type beside dsopen-generate's.
# Usage: scripts/bench_llamacpp.sh [MODEL_DIR]     (default runs/tiny: train configs/tiny.yaml first)
# Env: TYPES ("f32 f16 bf16 q8_0 q4_0")  NEW (32)  THREADS (nproc)  WORK (runs/bench-llamacpp)  BENCH (1: speed too)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/build/bin"
MODEL="${1:-$ROOT/runs/tiny}"
TYPES="${TYPES:-f32 f16 bf16 q8_0 q4_0}" NEW="${NEW:-32}" THREADS="${THREADS:-$(nproc)}" BENCH="${BENCH:-1}"
WORK="${WORK:-$ROOT/runs/bench-llamacpp}"
mkdir -p "$WORK"
LLAMA="$("$ROOT/scripts/build_llamacpp.sh")"
PROMPTS=("The meaning of life is" "Q: Why did the chicken cross the road?
A:" "你好，世界。今天" "There are 10 kinds of people: those who")

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) CPUs, threads $THREADS"
echo "model: $MODEL"
for type in $TYPES; do
  gguf="$WORK/model-$type.gguf"
  "$BIN/dsopen-convert" --model "$MODEL" --format gguf --type "$type" --out "$gguf" >/dev/null 2>"$WORK/convert.log" ||
    { cat "$WORK/convert.log" >&2; exit 1; }
  agree_total=0 n_total=0 ids_ok=0 notes=""
  for p in "${PROMPTS[@]}"; do
    ours="$("$BIN/dsopen-generate" --model "$MODEL" --prompt "$p" --max-new-tokens "$NEW" --temperature 0 \
      --repetition-penalty 1 --ignore-eos --threads "$THREADS" --json 2>/dev/null)"
    prompt_ids="$(python3 -c 'import json,sys; print(" ".join(map(str, json.loads(sys.argv[1])["prompt_ids"][0])))' "$ours")"
    theirs_ids="$("$LLAMA/llama-tokenize" -m "$gguf" -p "$p" --ids --log-disable 2>/dev/null | tr -d '[],')"
    [ "$prompt_ids" = "$theirs_ids" ] && ids_ok=$((ids_ok + 1))
    # The same prompt ids through llama.cpp, argmax at every step.
    theirs="$("$LLAMA/llamacpp_greedy" "$gguf" "$NEW" "$THREADS" $prompt_ids)"
    read -r agree n note < <(python3 - "$ours" "$theirs" <<'PY'
import json, sys
ours, theirs = json.loads(sys.argv[1])["tokens"][0], json.loads(sys.argv[2])
k = 0
while k < min(len(ours), len(theirs["tokens"])) and ours[k] == theirs["tokens"][k]:
    k += 1
# Where they part, llama.cpp's gap between its best and second-best logit: a near-tie is rounding, not a bug.
print(k, len(ours), f"step{k}:gap={theirs['gaps'][k]:.3g}" if k < len(ours) else "-")
PY
)
    agree_total=$((agree_total + agree)) n_total=$((n_total + n))
    [ "$note" != "-" ] && notes="$notes $note"
  done
  printf '%-5s prompt ids equal %d/%d; greedy tokens agree %d/%d%s\n' "$type" "$ids_ok" "${#PROMPTS[@]}" \
    "$agree_total" "$n_total" "${notes:+ (parted at$notes)}"
done

if [ "$BENCH" = 1 ]; then
  echo "speed (llama-bench: pp64 prefill and tg64 decode tokens/s, $THREADS threads)"
  for type in $TYPES; do
    "$LLAMA/llama-bench" -m "$WORK/model-$type.gguf" -p 64 -n 64 -t "$THREADS" -r 3 -o csv 2>/dev/null |
      python3 -c "import csv,sys
for r in csv.DictReader(sys.stdin):
    kind = 'prefill' if int(r['n_prompt']) else 'decode'
    print(f\"  llama.cpp $type {kind}: {float(r['avg_ts']):.1f} tok/s\")"
  done
  ids="$(seq -s, 10 73)"
  for dtype in fp32 bf16; do
    "$BIN/dsopen-generate" --model "$MODEL" --prompt-ids "$ids" --max-new-tokens 64 --temperature 0 --ignore-eos \
      --dtype "$dtype" --warmup 1 --repeat 3 --threads "$THREADS" --json 2>/dev/null |
      python3 -c "import json,sys
j = json.load(sys.stdin)
t = j.get('timings', j)
print('  dsopen $dtype prefill: %.1f tok/s, decode: %.1f tok/s' % (t['prefill_tokens_per_s'], t['decode_tokens_per_s']))"
  done
fi
