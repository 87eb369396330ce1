#!/usr/bin/env bash
# Binaries: --help and --version exit 0; usage errors print one line and exit 2.
set -u
BIN="$1"
fail=0
check() {  # check NAME EXPECTED_RC COMMAND...
  local name="$1" want="$2"; shift 2
  local out rc
  out="$("$@" 2>&1)"; rc=$?
  if [ "$rc" != "$want" ]; then echo "FAIL $name: exit $rc, want $want; output: $out"; fail=1; else echo "ok   $name"; fi
  LAST="$out"
}
for b in dsopen-model-info dsopen-bench-model dsopen-tokenizer dsopen-preprocess dsopen-train dsopen-eval dsopen-generate dsopen-convert dsopen-quantize dsopen-plot dsopen-serve; do
  check "$b --help" 0 "$BIN/$b" --help
  check "$b --version" 0 "$BIN/$b" --version
  case "$LAST" in *"0.1.0"*) ;; *) echo "FAIL $b --version does not print 0.1.0: $LAST"; fail=1 ;; esac
  check "$b --no-such-flag" 2 "$BIN/$b" --no-such-flag
done
check "model-info missing config" 2 "$BIN/dsopen-model-info" --config /nonexistent.yaml
check "train config is a directory" 2 "$BIN/dsopen-train" --config /tmp
case "$LAST" in *"error: /tmp: is a directory, not a config file"*) echo "ok   names the directory" ;; *) echo "FAIL message: $LAST"; fail=1 ;; esac
check "generate bad number" 2 "$BIN/dsopen-generate" --model /nonexistent --prompt x --max-new-tokens abc
case "$LAST" in *"error: --max-new-tokens: 'abc' is not a valid value"*) echo "ok   names the flag" ;; *) echo "FAIL message: $LAST"; fail=1 ;; esac
check "generate bad number (=)" 2 "$BIN/dsopen-generate" --model /nonexistent --prompt x --max-new-tokens=1e9x
case "$LAST" in *"error: --max-new-tokens: '1e9x' is not a valid value"*) echo "ok   names the flag (=)" ;; *) echo "FAIL message: $LAST"; fail=1 ;; esac
[ "$(echo "$LAST" | wc -l)" = 1 ] || { echo "FAIL error is not one line: $LAST"; fail=1; }
check "model-info 7b json" 0 "$BIN/dsopen-model-info" --config configs/7b.yaml --json
python3 - "$LAST" <<'PY' || fail=1
import json, sys
j = json.loads(sys.argv[1])
for k in ("total_params", "active_params", "flops_per_token", "kv_cache_bytes_per_token"):
    assert k in j, k
assert abs(j["total_params"] / 6.91e9 - 1) < 0.01, j["total_params"]
print("ok   model-info json fields")
PY
TMPC="$(mktemp -d)"
printf 'model: {flavor: tiny}\ndata:\n  seq_len: long\n' > "$TMPC/c.yaml"
check "model-info bad seq_len" 2 "$BIN/dsopen-model-info" --config "$TMPC/c.yaml"
case "$LAST" in *"c.yaml:3: data.seq_len: expected an integer, got 'long'"*) echo "ok   names file:line:key" ;; *) echo "FAIL message: $LAST"; fail=1 ;; esac
rm -rf "$TMPC"
check "tokenizer missing model" 1 "$BIN/dsopen-tokenizer" encode --model /nonexistent.model --text hi
check "tokenizer unknown command" 2 "$BIN/dsopen-tokenizer" frobnicate
TMP="$(mktemp -d)"
check "tokenizer train" 0 "$BIN/dsopen-tokenizer" train --input /usr/share/games/fortunes/fortunes --vocab-size 500 \
  --character-coverage 0.999 --output "$TMP/t.model"
check "tokenizer encode" 0 "$BIN/dsopen-tokenizer" encode --model "$TMP/t.model" --text "Hello world"
IDS="$LAST"
check "tokenizer decode" 0 "$BIN/dsopen-tokenizer" decode --model "$TMP/t.model" --ids "$IDS"
[ "$LAST" = "Hello world" ] || { echo "FAIL decode(encode(x)) != x: '$LAST'"; fail=1; }
check "tokenizer bad id" 2 "$BIN/dsopen-tokenizer" decode --model "$TMP/t.model" --ids "1 x"
rm -rf "$TMP"

# dsopen-train end to end: config errors, SIGTERM saves and exits 0, SIGKILL leaves a resumable run.
W="$(mktemp -d)"
cat > "$W/run.yaml" <<YAML
run: {name: cli, output_dir: $W/run, seed: 3, log_every: 1, threads: 1}
model: {flavor: debug, vocab_size: 512}
tokenizer:
  path: $W/tok.model
  train: {inputs: [/usr/share/games/fortunes/fortunes], vocab_size: 512, character_coverage: 0.999}
data:
  train: [$W/shards/f_*.bin]
  seq_len: 32
  build: {inputs: [/usr/share/games/fortunes/fortunes], output: $W/shards/f, doc_separator: "%"}
train: {max_steps: 100000, micro_batch_size: 2, lr: 1.0e-3, min_lr: 1.0e-4}
checkpoint: {every: 0}
YAML
# A job that cannot fit is refused from its config in seconds, before any allocation or output (exit 2, the plan
# on stderr, the error line naming the need, the memory and layouts that fit); --plan prints the plan anywhere.
check "train plan" 0 "$BIN/dsopen-train" --config "$W/run.yaml" --plan
case "$LAST" in *"memory plan per rank (1 rank, strategy none, fp32, micro-batch 2 x 32 tokens"*": fits"*) echo "ok   plan printed" ;; *) echo "FAIL plan: $LAST"; fail=1 ;; esac
start=$(date +%s)
check "train cannot fit" 2 timeout 60 "$BIN/dsopen-train" --config "$W/run.yaml" --set model.hidden_size=100000 --set model.intermediate_size=300000
case "$LAST" in *"error: model: the job needs "*" per rank but "*" is available"*) echo "ok   refusal names need and memory" ;; *) echo "FAIL refusal: $LAST"; fail=1 ;; esac
[ $(( $(date +%s) - start )) -le 10 ] || { echo "FAIL refusal took more than 10 s"; fail=1; }
[ ! -e "$W/run" ] || { echo "FAIL a refused job left $W/run behind"; fail=1; }
check "train plan that cannot fit" 0 "$BIN/dsopen-train" --config "$W/run.yaml" --plan --set model.num_hidden_layers=200 \
  --set model.hidden_size=8192 --set model.intermediate_size=22016 --set model.moe_intermediate_size=2048
case "$LAST" in *"does not fit"*) echo "ok   plan says it does not fit" ;; *) echo "FAIL plan: $LAST"; fail=1 ;; esac
# The trainer's plan and dsopen-model-info's agree: 7B under zero3 on 4 ranks (RANK/WORLD_SIZE as a launcher sets).
CFG7B="$(cd "$(dirname "$0")/.." && pwd)/configs/7b.yaml"
check "train plan 7b zero3" 0 env WORLD_SIZE=4 RANK=0 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29999 \
  "$BIN/dsopen-train" --config "$CFG7B" --plan --set parallel.strategy=zero3 --set train.precision=bf16
PLAN_TRAIN="$LAST"
check "model-info plan 7b zero3" 0 "$BIN/dsopen-model-info" --config "$CFG7B" --world-size 4 --strategy zero3 \
  --precision bf16 --micro-batch 1 --seq-len 4096 --activation-checkpointing --json
python3 - "$PLAN_TRAIN" "$LAST" <<'PY' || fail=1
import json, re, sys
train = float(re.search(r"\| total ([0-9.]+) GiB", sys.argv[1]).group(1))
info = json.loads(sys.argv[2])["plan"]["total"] / 2**30
good = abs(train - info) <= 0.05 + 0.005 * info
print(f"{'ok  ' if good else 'FAIL'} 7B zero3 on 4 ranks: dsopen-train --plan {train} GiB, dsopen-model-info {info:.2f} GiB")
sys.exit(0 if good else 1)
PY
# SIGTERM during setup (here: training a tokenizer on the whole corpus) exits at once with 143, saving nothing.
"$BIN/dsopen-train" --config "$W/run.yaml" --set "tokenizer.path=$W/slow/tok.model" --set tokenizer.train.vocab_size=16000 \
  --set 'tokenizer.train.inputs=[/usr/share/games/fortunes]' --set "run.output_dir=$W/slow" > "$W/slow.log" 2>&1 &
pid=$!
sleep 1  # tokenizer training on the whole corpus takes far longer
kill -TERM "$pid"
t0=$(date +%s)
wait "$pid"; rc=$?
[ "$rc" = 143 ] && [ $(( $(date +%s) - t0 )) -le 3 ] && echo "ok   SIGTERM during setup exits at once (143)" || { echo "FAIL SIGTERM during setup: exit $rc after $(( $(date +%s) - t0 ))s: $(tail -2 "$W/slow.log")"; fail=1; }
printf 'base: run.yaml\ntrain:\n  lrr: 1\n' > "$W/bad.yaml"
check "train config error" 2 "$BIN/dsopen-train" --config "$W/bad.yaml"
case "$LAST" in *"bad.yaml:3: train.lrr: unknown key (did you mean 'lr'?)"*) echo "ok   names file:line:key" ;; *) echo "FAIL message: $LAST"; fail=1 ;; esac
wait_for_steps() {  # wait_for_steps N: until metrics.jsonl has N lines (60 s at most)
  for _ in $(seq 600); do
    [ -f "$W/run/metrics.jsonl" ] && [ "$(wc -l < "$W/run/metrics.jsonl")" -ge "$1" ] && return 0
    sleep 0.1
  done
  return 1
}
"$BIN/dsopen-train" --config "$W/run.yaml" > "$W/term.log" 2>&1 &
PID=$!
wait_for_steps 3 || { echo "FAIL training did not start"; cat "$W/term.log"; fail=1; }
kill -TERM $PID; wait $PID; rc=$?
if [ $rc = 0 ] && ls "$W"/run/checkpoints/step_* >/dev/null 2>&1; then echo "ok   SIGTERM saved a checkpoint and exited 0"
else echo "FAIL SIGTERM: exit $rc"; tail -5 "$W/term.log"; fail=1; fi
SAVED="$(cat "$W/run/checkpoints/latest")"
"$BIN/dsopen-train" --config "$W/run.yaml" --set checkpoint.every=1 > "$W/kill.log" 2>&1 &
PID=$!
wait_for_steps $(( $(wc -l < "$W/run/metrics.jsonl") + 4 ))
kill -KILL $PID; wait $PID 2>/dev/null
grep -q "resumed from .*$SAVED" "$W/kill.log" && echo "ok   resume: auto picked $SAVED" || { echo "FAIL no resume"; fail=1; }
LATEST="$(cd "$W/run/checkpoints" && ls -d step_* | grep -v tmp | sort | tail -1)"
STEP=$((10#${LATEST#step_}))
check "resume after SIGKILL" 0 "$BIN/dsopen-train" --config "$W/run.yaml" --set train.max_steps=$((STEP + 2))
case "$LAST" in *"resumed from"*) echo "ok   resumed after SIGKILL" ;; *) echo "FAIL did not resume: $LAST"; fail=1 ;; esac
# A fresh start (resume: none) into the run's directory would replace its checkpoints of the same steps and have
# pruning (which keeps the highest steps) delete its own: refused up front, nothing touched.
BEFORE="$(ls "$W/run/checkpoints"; cat "$W/run/checkpoints/latest")"
NEWEST="$(cd "$W/run/checkpoints" && ls -d step_* | grep -v tmp | sort | tail -1)"
check "train resume none into a used directory" 2 "$BIN/dsopen-train" --config "$W/run.yaml" --set checkpoint.resume=none \
  --set train.max_steps=2
case "$LAST" in *"checkpoint.dir: $W/run/checkpoints holds $NEWEST of another run, which a fresh start"*)
  echo "ok   names the checkpoint at stake" ;; *) echo "FAIL message: $LAST"; fail=1 ;; esac
[ "$(ls "$W/run/checkpoints"; cat "$W/run/checkpoints/latest")" = "$BEFORE" ] && echo "ok   checkpoints and latest untouched" ||
  { echo "FAIL checkpoints changed"; fail=1; }
check "eval ppl" 0 "$BIN/dsopen-eval" --model "$W/run/checkpoints/$(cat "$W/run/checkpoints/latest")" --data "$W/shards/f_*.bin" --ppl --seq-len 32 --batches 4
case "$LAST" in *perplexity*) echo "ok   $LAST" ;; *) echo "FAIL eval: $LAST"; fail=1 ;; esac
# Shards made by another tokenizer: the model's ids would mean other text. Refused, naming the shard.
mkdir -p "$W/othertok" && cp "$W"/shards/f_00000.* "$W/othertok/"
python3 -c 'import json, sys; p = sys.argv[1]; j = json.load(open(p)); j["tokenizer_hash"] = "0000"; json.dump(j, open(p, "w"))' "$W/othertok/f_00000.idx"
check "eval ppl, another tokenizer's shards" 1 "$BIN/dsopen-eval" --model "$W/run" --data "$W/othertok/f_*.bin" --ppl --seq-len 32 --batches 4
case "$LAST" in *"othertok/f_00000: shard tokenizer 0000 differs from the model's tokenizer"*) echo "ok   names the shard" ;;
  *) echo "FAIL message: $LAST"; fail=1 ;; esac
check "quantize calibration, another tokenizer's shards" 1 "$BIN/dsopen-quantize" --model "$W/run" --method gptq-int4 \
  --group-size 32 --calib-data "$W/othertok/f_*.bin" --calib-seq-len 32 --out "$W/q_other"
case "$LAST" in *"differs from the model's tokenizer"*) echo "ok   names the shard" ;; *) echo "FAIL message: $LAST"; fail=1 ;; esac
CK="$W/run/checkpoints/$(cat "$W/run/checkpoints/latest")"
check "generate" 0 "$BIN/dsopen-generate" --model "$CK" --prompt "The" --max-new-tokens 8 --seed 5
G1="$LAST"
check "generate same seed" 0 "$BIN/dsopen-generate" --model "$CK" --prompt "The" --max-new-tokens 8 --seed 5
[ "$(echo "$G1" | head -n -1)" = "$(echo "$LAST" | head -n -1)" ] && echo "ok   same seed, same text" || { echo "FAIL seeds differ: $G1 / $LAST"; fail=1; }
# A training checkpoint loads in transformers unchanged and gives our logits.
echo "1 20 30 40 50 60 70 80" > "$W/tokens.txt"
check "eval dump" 0 "$BIN/dsopen-eval" --model "$CK" --tokens "$W/tokens.txt" --dump-logits "$W/ours.safetensors"
python3 - "$CK" "$W" <<'PY' || fail=1
import sys, torch, transformers
from safetensors.torch import load_file
ck, w = sys.argv[1], sys.argv[2]
ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 80]])
with torch.no_grad():
    ref = transformers.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()(ids).logits
ours = load_file(w + "/ours.safetensors")["logits"]
rel = ((ours - ref).abs().max() / ref.abs().max()).item()
assert rel < 1e-4 and bool((ours.argmax(-1) == ref.argmax(-1)).all()), rel
print(f"ok   training checkpoint loads in transformers, logits agree ({rel:.1e})")
PY
# Quantized models: written by dsopen-quantize, read by dsopen-eval and dsopen-generate.
check "quantize int8" 0 "$BIN/dsopen-quantize" --model "$CK" --method rtn-int8 --group-size 16 --out "$W/q8"
check "eval quantized" 0 "$BIN/dsopen-eval" --model "$W/q8" --data "$W/shards/f_*.bin" --ppl --seq-len 32 --batches 4
case "$LAST" in *perplexity*) echo "ok   quantized $LAST" ;; *) echo "FAIL quantized eval: $LAST"; fail=1 ;; esac
check "generate quantized" 0 "$BIN/dsopen-generate" --model "$W/q8" --tokenizer "$CK" --prompt "The" --max-new-tokens 4
# Per-channel int8 (group -1): dsopen-generate keeps the codes and runs the int8 kernel; eval dequantizes.
check "quantize int8 per channel" 0 "$BIN/dsopen-quantize" --model "$CK" --method rtn-int8 --group-size -1 --out "$W/q8pc"
case "$LAST" in *"group size per row"*) echo "ok   per-channel groups reported" ;; *) echo "FAIL per-channel: $LAST"; fail=1 ;; esac
check "generate per-channel int8" 0 "$BIN/dsopen-generate" --model "$W/q8pc" --tokenizer "$CK" --prompt "The" --max-new-tokens 4
check "generate per-channel int8, AVX2 kernels" 0 env DSOPEN_GEMV_ISA=avx2 "$BIN/dsopen-generate" --model "$W/q8pc" --tokenizer "$CK" --prompt "The" --max-new-tokens 4
check "eval per-channel int8" 0 "$BIN/dsopen-eval" --model "$W/q8pc" --data "$W/shards/f_*.bin" --ppl --seq-len 32 --batches 4
# Fixed-length benchmark runs: token-id prompts, EOS ignored, a JSON summary; bf16 weights and cache.
for dt in fp32 bf16; do
  check "generate ids json $dt" 0 "$BIN/dsopen-generate" --model "$CK" --prompt-ids "5 6 7" --prompt-ids 8,9,10 --no-bos \
    --ignore-eos --max-new-tokens 6 --temperature 0 --dtype "$dt" --warmup 1 --repeat 2 --json
  python3 - "$LAST" "$dt" <<'PY' || fail=1
import json, sys
j = json.loads(sys.argv[1])
assert j["dtype"] == sys.argv[2] and j["batch"] == 2 and j["prompt_tokens"] == 6, j
assert j["generated_tokens"] == 12 and j["decode_forwards"] == 5 and [len(t) for t in j["tokens"]] == [6, 6], j
assert j["prefill_tokens_per_s"] > 0 and j["decode_tokens_per_s"] > 0 and "texts" not in j, j
print(f"ok   generate --json {sys.argv[2]}: {j['decode_tokens_per_s']:.0f} decode tokens/s")
PY
done
check "generate comma prompt" 0 "$BIN/dsopen-generate" --model "$CK" --prompt "Hello, world" --max-new-tokens 2 --temperature 0
case "$LAST" in "Hello, world"*) echo "ok   a comma does not split a prompt" ;; *) echo "FAIL comma prompt: $LAST"; fail=1 ;; esac
check "generate bad ids" 2 "$BIN/dsopen-generate" --model "$CK" --prompt-ids "5 x"
# The tiles/GEMM crossover of prompt products: measured by the first process on a machine, read by the next.
TC="$(mktemp -d)"
check "generate measures the crossover" 0 env DSOPEN_CACHE="$TC/cache" "$BIN/dsopen-generate" --model "$CK" --prompt-ids "5 6 7" --max-new-tokens 2
ls "$TC"/cache/tile-rows-*.txt >/dev/null 2>&1 || { echo "FAIL no cache file in $TC/cache"; fail=1; }
BEFORE="$(stat -c '%i %y' "$TC"/cache/tile-rows-*.txt 2>&1)"
check "generate reads the crossover" 0 env DSOPEN_CACHE="$TC/cache" "$BIN/dsopen-generate" --model "$CK" --prompt-ids "5 6 7" --max-new-tokens 2
[ "$(stat -c '%i %y' "$TC"/cache/tile-rows-*.txt 2>&1)" = "$BEFORE" ] && echo "ok   read, not measured again" || { echo "FAIL cache file rewritten"; fail=1; }
rm -rf "$TC"
check "generate bad DSOPEN_GEMV_ISA" 2 env DSOPEN_GEMV_ISA=sse9 "$BIN/dsopen-generate" --model "$CK" --prompt-ids "5 6 7"
case "$LAST" in *"DSOPEN_GEMV_ISA: 'sse9' is not an instruction set"*) echo "ok   names the variable" ;; *) echo "FAIL message: $LAST"; fail=1 ;; esac
check "generate bad DSOPEN_TILE_ROWS" 2 env DSOPEN_TILE_ROWS=lots "$BIN/dsopen-generate" --model "$CK" --prompt-ids "5 6 7"
case "$LAST" in *"DSOPEN_TILE_ROWS: 'lots' is not a row count"*) echo "ok   names the variable" ;; *) echo "FAIL message: $LAST"; fail=1 ;; esac
# --chat without a prompt: one user turn per stdin line, the conversation kept.
check "chat on stdin" 0 bash -c "printf 'Hello\n/reset\nAgain\n' | '$BIN/dsopen-generate' --model '$CK' --chat --system 'Be brief.' --temperature 0 --max-new-tokens 4"
check "quantize bad method" 2 "$BIN/dsopen-quantize" --model "$CK" --method rtn-int3 --out "$W/qx"
check "quantize bad group" 2 "$BIN/dsopen-quantize" --model "$CK" --method rtn-int4 --group-size 7 --out "$W/qx"
check "generate no prompt" 2 "$BIN/dsopen-generate" --model "$CK"
# The context bounds prompt + generation: a prompt that fills it is refused, one near it stops early with a note.
CTX=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['max_position_embeddings'])" "$CK/config.json")
check "generate prompt beyond context" 2 "$BIN/dsopen-generate" --model "$CK" --prompt-ids "$(yes 5 | head -n "$CTX" | tr '\n' ' ')"
case "$LAST" in *"context is $CTX"*) echo "ok   over-long prompt named" ;; *) echo "FAIL over-long prompt: $LAST"; fail=1 ;; esac
check "generate up to context" 0 "$BIN/dsopen-generate" --model "$CK" --prompt-ids "$(yes 5 | head -n $((CTX - 3)) | tr '\n' ' ')" \
  --max-new-tokens 10 --ignore-eos --temperature 0
case "$LAST" in *"stopped at the model's context of $CTX"*) echo "ok   stop at the context is reported" ;; *) echo "FAIL no context note: $LAST"; fail=1 ;; esac
check "generate missing adapter" 1 "$BIN/dsopen-generate" --model "$CK" --adapter "$W/nope" --prompt "The"
case "$LAST" in *"$W/nope: adapter directory not found"*) echo "ok   missing adapter named" ;; *) echo "FAIL missing adapter: $LAST"; fail=1 ;; esac
# An EOS list (config.json or generation_config.json) and generation defaults: read by generate, kept by convert.
mkdir -p "$W/eoslist" && cp "$CK"/* "$W/eoslist/" 2>/dev/null
python3 - "$W/eoslist" <<'PY'
import json, sys
d = sys.argv[1]
c = json.load(open(f"{d}/config.json")); c["eos_token_id"] = [2, 7]; json.dump(c, open(f"{d}/config.json", "w"))
json.dump({"do_sample": False, "eos_token_id": [2, 7, 9], "max_new_tokens": 3}, open(f"{d}/generation_config.json", "w"))
PY
check "generate eos list" 0 "$BIN/dsopen-generate" --model "$W/eoslist" --prompt "The" --json
python3 - "$LAST" <<'PY' || fail=1
import json, sys
s = json.loads(sys.argv[1].splitlines()[-1])["sampling"]
assert s["eos_token_ids"] == [2, 7, 9] and s["temperature"] == 0 and s["defaults_from"].endswith("generation_config.json"), s
print("ok   generate takes its defaults and EOS list from generation_config.json")
PY
check "convert keeps eos list" 0 "$BIN/dsopen-convert" --model "$W/eoslist" --out "$W/eoslist_out"
python3 - "$W/eoslist_out" <<'PY' || fail=1
import json, sys
d = sys.argv[1]
assert json.load(open(f"{d}/config.json"))["eos_token_id"] == [2, 7], "config.json"
assert json.load(open(f"{d}/generation_config.json"))["eos_token_id"] == [2, 7, 9], "generation_config.json"
print("ok   convert keeps the EOS lists of config.json and generation_config.json")
PY
echo '{"do_sample": "yes"}' > "$W/eoslist/generation_config.json"
check "generate bad generation_config" 2 "$BIN/dsopen-generate" --model "$W/eoslist" --prompt "The"
case "$LAST" in *"generation_config.json: do_sample: expected true or false"*) echo "ok   bad generation_config.json named" ;;
  *) echo "FAIL bad generation_config: $LAST"; fail=1 ;; esac
check "eval missing model" 1 "$BIN/dsopen-eval" --model "$W/nope" --data x --ppl
# LoRA: configs/lora.yaml on the checkpoint above for a few steps; the checkpoint holds only the adapter; generate
# and eval take --adapter; the base merged by dsopen-convert --adapter gives the adapter's logits.
LORA=(--config configs/lora.yaml --set model.pretrained="$CK" --set tokenizer.path="$W/tok.model"
      --set run.output_dir="$W/lora" --set checkpoint.dir="$W/lora/checkpoints" --set run.threads=1)
check "lora train" 0 "$BIN/dsopen-train" "${LORA[@]}" --set train.max_steps=3 --set train.eval_every=0
case "$LAST" in *"trainable parameters"*"saved "*" MB)"*) echo "ok   lora logs trainable parameters and checkpoint size" ;;
  *) echo "FAIL lora log: $LAST"; fail=1 ;; esac
LCK="$W/lora/checkpoints/$(cat "$W/lora/checkpoints/latest")"
if [ -f "$LCK/adapter_config.json" ] && [ -f "$LCK/adapter_model.safetensors" ] && [ ! -e "$LCK/model.safetensors" ]; then
  echo "ok   lora checkpoint holds the adapter only"; else echo "FAIL lora checkpoint: $(ls "$LCK")"; fail=1; fi
check "generate with adapter" 0 "$BIN/dsopen-generate" --model "$CK" --adapter "$LCK" --chat --prompt "Hi" --max-new-tokens 4 --temperature 0
# --adapter takes what --model takes: the run directory, its checkpoints directory or the `latest` file.
tokens_of() { "$BIN/dsopen-generate" --model "$CK" --adapter "$1" --prompt "Hi" --max-new-tokens 6 --temperature 0 --json 2>/dev/null |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["tokens"])'; }
A1="$(tokens_of "$LCK")"
for a in "$W/lora" "$W/lora/checkpoints" "$W/lora/checkpoints/latest"; do
  A2="$(tokens_of "$a")"
  if [ -n "$A1" ] && [ "$A2" = "$A1" ]; then echo "ok   --adapter $a is the latest adapter checkpoint"
  else echo "FAIL --adapter $a: '$A2' vs '$A1'"; fail=1; fi
done
check "eval with adapter" 0 "$BIN/dsopen-eval" --model "$CK" --adapter "$LCK" --tokens "$W/tokens.txt" --dump-logits "$W/adapter.safetensors"
check "convert merges adapter" 0 "$BIN/dsopen-convert" --model "$CK" --adapter "$LCK" --out "$W/merged"
check "eval merged" 0 "$BIN/dsopen-eval" --model "$W/merged" --tokens "$W/tokens.txt" --dump-logits "$W/merged.safetensors"
python3 - "$W" <<'PY' || fail=1
import sys
from safetensors.torch import load_file
w = sys.argv[1]
a, m, b = (load_file(f"{w}/{n}.safetensors")["logits"] for n in ("adapter", "merged", "ours"))
err, moved = (a - m).abs().max().item(), (a - b).abs().max().item()
assert err <= 1e-5 and moved > 1e-4, (err, moved)
print(f"ok   merged model = base + adapter (max abs {err:.1e}; the adapter moves the logits by {moved:.1e})")
PY
check "lora resume" 0 "$BIN/dsopen-train" "${LORA[@]}" --set train.max_steps=4 --set train.eval_every=0
case "$LAST" in *"resumed from"*) echo "ok   lora run resumed from its adapter checkpoint" ;; *) echo "FAIL lora resume: $LAST"; fail=1 ;; esac
check "lora rank 0" 2 "$BIN/dsopen-train" "${LORA[@]}" --set lora.r=0
case "$LAST" in *"lora.r: must be >= 1, got 0"*) ;; *) echo "FAIL message: $LAST"; fail=1 ;; esac
check "lora targets nothing" 2 "$BIN/dsopen-train" "${LORA[@]}" --set 'lora.target_modules=[k_proj]' --set run.output_dir="$W/lora_x"
case "$LAST" in *"lora.target_modules: selects no projection of this model"*) ;; *) echo "FAIL message: $LAST"; fail=1 ;; esac
check "adapter missing" 1 "$BIN/dsopen-eval" --model "$CK" --adapter "$W/nope" --tokens "$W/tokens.txt" --dump-logits "$W/x.safetensors"
[ "$(echo "$LAST" | wc -l)" = 1 ] && case "$LAST" in *"adapter directory not found"*) true ;; *) false ;; esac || { echo "FAIL message: $LAST"; fail=1; }
# SFT on a Jinja chat template (data.chat_template.jinja): trains, and the run's checkpoints render chats with it.
printf '%s' "{% for m in messages %}{{ '<|User|>' if m.role == 'user' else '<|Assistant|>' }}{{ m.content }}<|end|>
{% endfor %}{% if add_generation_prompt %}<|Assistant|>{% endif %}" > "$W/chatml.jinja"
check "lora train with a jinja template" 0 "$BIN/dsopen-train" "${LORA[@]}" --set run.output_dir="$W/lora_j" \
  --set checkpoint.dir="$W/lora_j/checkpoints" --set data.chat_template.jinja="$W/chatml.jinja" \
  --set train.max_steps=2 --set train.eval_every=0
JCK="$W/lora_j/checkpoints/$(cat "$W/lora_j/checkpoints/latest")"
echo '[{"role": "user", "content": "Hi"}]' > "$W/hi.json"
check "chat format of a jinja run" 0 "$BIN/dsopen-tokenizer" chat --model "$JCK" --messages "$W/hi.json" --json
python3 - "$LAST" <<'PY' || fail=1
import json, sys
out = json.loads(sys.argv[1].strip().splitlines()[-1])
assert out["text"] == "<|User|>Hi<|end|>\n<|Assistant|>" and "chatml.jinja" in out["format"], out
print("ok   a run trained on a jinja template renders chats with it")
PY
check "missing jinja template" 2 "$BIN/dsopen-train" "${LORA[@]}" --set data.chat_template.jinja="$W/nope.jinja"
case "$LAST" in *"data.chat_template.jinja"*"does not exist"*) echo "ok   a missing jinja template is named" ;;
  *) echo "FAIL message: $LAST"; fail=1 ;; esac
rm -rf "$W"
exit $fail
