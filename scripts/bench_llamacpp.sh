#!/usr/bin/env bash
# Our GGUF files in llama.cpp itself: dsopen-convert --format gguf writes the default job's checkpoint in each type,
# llama.cpp (built from the copy on PyPI, scripts/build_llamacpp.sh) tokenizes the prompts (compared with our ids)
# and decodes greedily from our prompt ids (bench/llamacpp_greedy.cpp: argmax per step, EOS not suppressed, as
# dsopen-generate --temperature 0 --ignore-eos). Reported: how many of the NEW tokens per prompt agree, and where
# they part, llama.cpp's gap between its two best logits there (a near-tie flipped by rounding, not a bug: quantized
# types part earlier). Then (BENCH=1) the speed table of docs/BENCHMARKS.md: decode and prefill tokens/s of both
# engines at fp32/F32, bf16/BF16, int8/Q8_0 and int4/Q4_0 on a dense ~97M model and on MODEL (MoE).
# Usage: scripts/bench_llamacpp.sh [MODEL_DIR]     (default runs/tiny: train configs/tiny.yaml first)
# Env: TYPES ("f32 f16 bf16 q8_0 q4_0")  NEW (32)  THREADS (nproc)  WORK (runs/bench-llamacpp)  BENCH (1: speed too)
#      ISA (native; avx2: both engines limited to AVX2 + FMA — llama.cpp built so, ours with DSOPEN_GEMV_ISA=avx2 and
#      LibTorch's kernels with ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA — what a CPU without
#      AVX-512 gets, measured on one with it)
set -euo pipefail
ISA="${ISA:-native}"
if [ "$ISA" = avx2 ]; then
  export LLAMACPP_ISA=avx2 DSOPEN_GEMV_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
elif [ "$ISA" != native ]; then
  echo "error: ISA: '$ISA' is not native or avx2" >&2; exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/build/bin"
MODEL="${1:-$ROOT/runs/tiny}"
TYPES="${TYPES:-f32 f16 bf16 q8_0 q4_0}" NEW="${NEW:-32}" THREADS="${THREADS:-$(nproc)}" BENCH="${BENCH:-1}"
WORK="${WORK:-$ROOT/runs/bench-llamacpp}"
mkdir -p "$WORK"
LLAMA="$("$ROOT/scripts/build_llamacpp.sh")"
PROMPTS=("The meaning of life is" "Q: Why did the chicken cross the road?
A:" "你好，世界。今天" "There are 10 kinds of people: those who")

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) CPUs, threads $THREADS, instruction sets: $ISA"
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

[ "$BENCH" = 1 ] || exit 0
# ---- speed: the same models in both engines, batch 1, 64 prompt + 64 decoded tokens -------------------------------
# Dense: a random Llama of ~97M parameters (vocab 8000, hidden 768, 12 layers) saved by transformers, with the
# tokenizer of MODEL; llama.cpp's files from its own convert_hf_to_gguf.py (F32, BF16) and llama-quantize (Q8_0,
# Q4_0); dsopen's from dsopen-quantize (rtn-int8 per channel, rtn-int4 group 32, --quantize-head: llama-quantize
# stores the output layer quantized too, in Q8_0 for Q8_0 and Q6_K for Q4_0). MoE: MODEL itself, llama.cpp's
# files from dsopen-convert --format gguf (its converter has no SentencePiece vocabulary for deepseek2).
SRC="$(dirname "$(dirname "$LLAMA")")/src"
DENSE="$WORK/dense-97m"
if [ ! -f "$DENSE/model.safetensors" ]; then
  python3 - "$DENSE" "$MODEL" <<'PY'
import os, shutil, sys, glob, torch, transformers
d, src = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=8000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                               num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
transformers.LlamaForCausalLM(cfg).save_pretrained(d)
tok = [p for p in glob.glob(os.path.join(src, "**", "tokenizer.model"), recursive=True)][0]
shutil.copy(tok, d)
PY
fi
prepare() {  # NAME DIR: both engines' files for one model
  local name="$1" dir="$2"
  if [ "$name" = dense ]; then
    for t in f32 bf16; do
      [ -f "$WORK/$name-$t.gguf" ] || PYTHONPATH="$SRC/gguf-py" python3 "$SRC/convert_hf_to_gguf.py" "$dir" --outtype "$t" \
        --outfile "$WORK/$name-$t.gguf" >"$WORK/convert.log" 2>&1 || { tail -5 "$WORK/convert.log" >&2; exit 1; }
    done
  else
    for t in f32 bf16; do "$BIN/dsopen-convert" --model "$dir" --format gguf --type "$t" --out "$WORK/$name-$t.gguf" >/dev/null 2>&1; done
  fi
  for t in q8_0 q4_0; do
    [ -f "$WORK/$name-$t.gguf" ] || "$LLAMA/llama-quantize" "$WORK/$name-f32.gguf" "$WORK/$name-$t.gguf" \
      "$(echo "$t" | tr a-z A-Z)" >/dev/null 2>&1
  done
  [ -d "$WORK/$name-int8h" ] || "$BIN/dsopen-quantize" --model "$dir" --method rtn-int8 --group-size -1 --quantize-head \
    --out "$WORK/$name-int8h" >/dev/null 2>&1
  [ -d "$WORK/$name-int4h" ] || "$BIN/dsopen-quantize" --model "$dir" --method rtn-int4 --group-size 32 --quantize-head \
    --out "$WORK/$name-int4h" >/dev/null 2>&1
}
ours() {  # DIR EXTRA...: "prefill decode" tokens/s, best of 3 after a warm-up
  "$BIN/dsopen-generate" --model "$1" "${@:2}" --prompt-ids "$(seq -s, 10 73)" --max-new-tokens 64 --temperature 0 \
    --ignore-eos --warmup 1 --repeat 3 --threads "$THREADS" --json 2>/dev/null |
    python3 -c "import json,sys; j=json.load(sys.stdin); print(j['prefill_tokens_per_s'], j['decode_tokens_per_s'])"
}
theirs() {  # FILE: "prefill decode" tokens/s from llama-bench (pp64, tg64, 3 repetitions)
  "$LLAMA/llama-bench" -m "$1" -p 64 -n 64 -t "$THREADS" -r 3 -o csv 2>/dev/null | python3 -c "import csv,sys
r = {('pp' if int(x['n_prompt']) else 'tg'): float(x['avg_ts']) for x in csv.DictReader(sys.stdin)}
print(r['pp'], r['tg'])"
}
echo
echo "| model | format (ours / llama.cpp) | decode tok/s ours | llama.cpp | x | prefill tok/s ours | llama.cpp | x |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
for spec in "dense:$DENSE" "moe:$MODEL"; do
  name="${spec%%:*}" dir="${spec#*:}"
  prepare "$name" "$dir"
  for row in "fp32 / F32:$dir::f32" "bf16 / BF16:$dir:--dtype bf16:bf16" "int8 / Q8_0:$WORK/$name-int8h::q8_0" \
             "int4 / Q4_0:$WORK/$name-int4h::q4_0"; do
    IFS=: read -r label qdir extra t <<<"$row"
    # shellcheck disable=SC2086
    read -r op od < <(ours "$qdir" $extra)
    read -r tp td < <(theirs "$WORK/$name-$t.gguf")
    python3 -c "import sys
n, l, op, od, tp, td = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
print(f'| {n} | {l} | {od:.1f} | {td:.1f} | {od / td:.2f} | {op:.0f} | {tp:.0f} | {op / tp:.2f} |')" "$name" "$label" "$op" "$od" "$tp" "$td"
  done
done
