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
for b in dsopen-model-info dsopen-bench-model dsopen-tokenizer; do
  check "$b --help" 0 "$BIN/$b" --help
  check "$b --version" 0 "$BIN/$b" --version
  case "$LAST" in *"0.1.0"*) ;; *) echo "FAIL $b --version does not print 0.1.0: $LAST"; fail=1 ;; esac
  check "$b --no-such-flag" 2 "$BIN/$b" --no-such-flag
done
check "model-info missing config" 2 "$BIN/dsopen-model-info" --config /nonexistent.yaml
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
exit $fail
