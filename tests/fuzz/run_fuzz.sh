#!/usr/bin/env bash
# Builds the safetensors header fuzzer with clang (libFuzzer + ASan + UBSan) and runs it for a bounded time on a
# seed corpus of valid and corrupt files. Usage: run_fuzz.sh BUILD_DIR [SECONDS]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="$1/fuzz"
SECONDS_TO_RUN="${2:-60}"
mkdir -p "$OUT/corpus"
command -v clang++ >/dev/null || { echo "run_fuzz.sh: clang++ not found (scripts/setup.sh installs clang)"; exit 1; }
SOURCES=("$ROOT/tests/fuzz/safetensors_fuzz.cpp" "$ROOT/model/safetensors_header.cpp" "$ROOT/utils/json.cpp"
         "$ROOT/utils/errors.cpp")
stale=0
for s in "${SOURCES[@]}"; do [ "$s" -nt "$OUT/safetensors_fuzz" ] && stale=1; done
if [ ! -x "$OUT/safetensors_fuzz" ] || [ $stale = 1 ]; then
  clang++ -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -I "$ROOT" \
    "${SOURCES[@]}" -o "$OUT/safetensors_fuzz"
fi
# Seeds: a valid file with several dtypes, classic corruptions of it, and the cases readers have disagreed on (a
# gap before the first tensor, a hole between two, a repeated key, zero-size tensors, sub-byte dtypes).
python3 - "$OUT/corpus" <<'PY'
import json, os, struct, sys
d = sys.argv[1]
def write(name, header, data):
    h = json.dumps(header).encode()
    open(os.path.join(d, name), "wb").write(struct.pack("<Q", len(h)) + h + data)
ok = {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
      "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]}, "c": {"dtype": "I64", "shape": [], "data_offsets": [22, 30]}}
write("valid", ok, bytes(30))
write("overlap", dict(ok, b={"dtype": "BF16", "shape": [3], "data_offsets": [10, 16]}), bytes(30))
write("past_end", ok, bytes(20))
write("bad_dtype", dict(ok, a={"dtype": "F7", "shape": [2, 2], "data_offsets": [0, 16]}), bytes(30))
open(os.path.join(d, "short"), "wb").write(b"\x05\x00")
write("gap_before_first", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12))
write("hole", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}, bytes(16))
write("zero_middle", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                      "z": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
                      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8))
write("sub_byte", {"a": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]},
                   "b": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [2, 5]}}, bytes(5))
dup = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}'
open(os.path.join(d, "duplicate"), "wb").write(struct.pack("<Q", len(dup)) + dup + bytes(16))
PY
"$OUT/safetensors_fuzz" -max_total_time="$SECONDS_TO_RUN" -timeout=10 -print_final_stats=1 "$OUT/corpus" 2>&1 | tail -n 15
echo "fuzzing finished without a crash"
