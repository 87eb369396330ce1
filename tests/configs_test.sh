#!/usr/bin/env bash
# The published-model run configs (configs/7b.yaml, 67b, v2-lite, v3) stay runnable: on this machine each is refused
# at once with its memory plan, and each trains a few steps on the CPU with only width and depth scaled down by
# --set — the real vocabulary, the real schedule and optimizer settings, a byte-level BPE tokenizer.json with the
# model family's pre-tokenizer built here, and the shipped corpus tokenized with it.
# Usage: configs_test.sh BIN_DIR (run from the repository root)
set -u
BIN="$1"
fail=0
T="$(mktemp -d)"
trap 'rm -rf "$T"' EXIT
python3 tests/python/make_hf_tokenizer.py "$T/tok" > /dev/null || { echo "FAIL make_hf_tokenizer.py"; exit 1; }
# A tokenizer.json without its tokenizer_config.json has no end-of-text token: shards are refused, naming the fix.
out="$("$BIN/dsopen-preprocess" --tokenizer "$T/tok/llm/tokenizer.json" --input /usr/share/games/fortunes/fortunes \
  --output "$T/noeos/f" 2>&1)"; rc=$?
case "$out" in *"no end-of-text token"*"tokenizer_config.json"*) [ "$rc" = 1 ] && echo "ok   a tokenizer without EOS is refused" || { echo "FAIL exit $rc"; fail=1; } ;;
  *) echo "FAIL tokenizer without EOS: $out"; fail=1 ;; esac
cp "$T/tok/tokenizer_config.json" "$T/tok/llm/"

for c in 7b 67b v2-lite v3; do
  start=$(date +%s)
  out="$("$BIN/dsopen-train" --config "configs/$c.yaml" 2>&1)"; rc=$?
  took=$(( $(date +%s) - start ))
  case "$out" in
    *"memory plan per rank"*"error: model: the job needs "*) [ "$rc" = 2 ] && [ "$took" -le 10 ] && echo "ok   $c refused in ${took}s with its plan" || { echo "FAIL $c: exit $rc after ${took}s"; fail=1; } ;;
    *"error: models/"*"tokenizer not found"*"HuggingFace repository"*) echo "ok   $c names where its tokenizer.json goes" ;;
    *) echo "FAIL $c: $out"; fail=1 ;;
  esac
done

# Width and depth scaled down; everything else as shipped.
small=(--set model.hidden_size=64 --set model.intermediate_size=128 --set model.num_hidden_layers=2
       --set model.num_attention_heads=4 --set data.seq_len=64 --set data.valid_fraction=0.05
       --set train.max_steps=4 --set train.micro_batch_size=2 --set train.grad_accum_steps=2
       --set train.warmup_steps=1 --set train.eval_every=2 --set train.eval_steps=1 --set checkpoint.every=2
       --set 'data.build.inputs=[/usr/share/games/fortunes/fortunes]')
mla=(--set model.kv_lora_rank=32 --set model.qk_nope_head_dim=16 --set model.qk_rope_head_dim=8
     --set model.v_head_dim=16 --set model.moe_intermediate_size=32 --set model.first_k_dense_replace=1)
declare -A extra=(
  [7b]="--set model.num_key_value_heads=4"
  [67b]="--set model.num_key_value_heads=2"
  [v2-lite]="--set model.n_routed_experts=8 --set model.num_experts_per_tok=2"
  [v3]="--set model.q_lora_rank=32 --set model.n_routed_experts=16 --set model.num_experts_per_tok=4 --set model.n_group=4 --set model.topk_group=2"
)
declare -A tok=([7b]="$T/tok/llm/tokenizer.json" [67b]="$T/tok/llm/tokenizer.json" [v2-lite]="$T/tok/llm/tokenizer.json"
                [v3]="$T/tok/tokenizer.json")
for c in 7b 67b v2-lite v3; do
  args=("${small[@]}" --set "tokenizer.path=${tok[$c]}" --set "run.output_dir=$T/$c" --set "data.build.output=$T/$c/data/f"
        --set "data.train=[$T/$c/data/f_*.bin]")
  case "$c" in v2-lite|v3) args+=("${mla[@]}") ;; esac
  # shellcheck disable=SC2206
  args+=(${extra[$c]})
  out="$("$BIN/dsopen-train" --config "configs/$c.yaml" "${args[@]}" 2>&1)"; rc=$?
  if [ "$rc" != 0 ]; then echo "FAIL $c scaled down: exit $rc: $(echo "$out" | tail -3)"; fail=1; continue; fi
  case "$out" in
    *"memory plan per rank"*"fits"*"the tokenizer has"*"embeddings"*"step 4/4"*"done at step 4/4"*) echo "ok   $c scaled down trains 4 steps (real vocabulary, schedule, bf16, zero2, checkpointing)" ;;
    *) echo "FAIL $c scaled down: the log lacks the plan, the vocabulary warning or step 4: $(echo "$out" | tail -5)"; fail=1 ;;
  esac
  ls "$T/$c/checkpoints/step_00000004/model.safetensors" > /dev/null 2>&1 || { echo "FAIL $c: no checkpoint at step 4"; fail=1; }
done
exit $fail
