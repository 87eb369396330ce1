#!/usr/bin/env bash
# Builds and checks DeepSeek-Open on a CUDA machine that has python3 + torch (CUDA), cmake and nvcc but no package
# registry (so none of the Debian libraries). Two steps:
#
#   scripts/gpu_check.sh --prepare    on a machine with apt: downloads the library .debs (and the fortunes corpus)
#                                     into .deps/debs (ignored by git; carry it to the GPU machine)
#   scripts/gpu_check.sh [OUT_DIR]    on the GPU machine: unpacks .deps/debs into .deps/prefix, configures and builds
#                                     build-gpu/ against python3's torch, runs the CUDA tests (tests/test_cuda.cpp),
#                                     CUDA training runs (bf16, fp16 with loss scaling, zero2 + optimizer offload, zero3) and
#                                     the bf16 throughput benchmark against PyTorch. Results: OUT_DIR (default
#                                     $OUT or gpu-results/), summary in OUT_DIR/summary.txt.
#
# One GPU cannot run NCCL across ranks (NCCL refuses two ranks on one device); the NCCL backend is compiled and used
# by the same code as Gloo (train/process_group.cpp) and needs two GPUs to exercise.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEBS="$ROOT/.deps/debs"
PACKAGES=(libsentencepiece-dev libsentencepiece0 libyaml-cpp-dev libyaml-cpp0.7 libspdlog-dev libspdlog1.10
  libfmt-dev libfmt9 libcxxopts-dev catch2 nlohmann-json3-dev libpcre2-dev libpcre2-8-0 libgloo-dev
  pkgconf pkgconf-bin libpkgconf3 fortunes fortunes-min fortunes-zh libgoogle-perftools-dev libtcmalloc-minimal4)

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$DEBS" && cd "$DEBS" || exit 1
  apt-get download "${PACKAGES[@]}" || { echo "gpu_check: apt-get download failed (run apt-get update?)" >&2; exit 1; }
  echo "gpu_check: $(ls "$DEBS" | wc -l) packages, $(du -sh "$DEBS" | cut -f1) in $DEBS"
  exit 0
fi

OUT_DIR="${1:-${OUT:-$ROOT/gpu-results}}"
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
run_logged() {  # run_logged NAME COMMAND...: output to OUT_DIR/NAME.log, one summary line
  local name="$1"; shift
  local t0=$SECONDS
  "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  say "$([ $rc = 0 ] && echo ok || echo "FAIL($rc)") $name ($((SECONDS - t0)) s)"
  return $rc
}
say "gpu_check $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1 | tee -a "$SUMMARY"

# 1. Libraries from the carried .debs, unpacked into a private prefix with relocated pkg-config files.
PREFIX="$ROOT/.deps/prefix"
ls "$DEBS"/*.deb > /dev/null 2>&1 || { say "FAIL no .debs in $DEBS: run scripts/gpu_check.sh --prepare where apt works"; exit 1; }
if [ ! -f "$PREFIX/.unpacked" ]; then
  rm -rf "$PREFIX" && mkdir -p "$PREFIX"
  for d in "$DEBS"/*.deb; do dpkg-deb -x "$d" "$PREFIX" 2>/dev/null || dpkg -x "$d" "$PREFIX"; done
  find "$PREFIX" -name '*.pc' -exec sed -i "s|^prefix=/usr|prefix=$PREFIX/usr|" {} +
  touch "$PREFIX/.unpacked"
fi
ARCH_LIB="$PREFIX/usr/lib/x86_64-linux-gnu"
export PKG_CONFIG_PATH="$ARCH_LIB/pkgconfig:$PREFIX/usr/share/pkgconfig:${PKG_CONFIG_PATH:-}"
export CPATH="$PREFIX/usr/include:${CPATH:-}"
export LIBRARY_PATH="$ARCH_LIB:${LIBRARY_PATH:-}"
export LD_LIBRARY_PATH="$ARCH_LIB:${LD_LIBRARY_PATH:-}"
export PATH="$PREFIX/usr/bin:$PATH"
command -v pkg-config > /dev/null || ln -sf "$PREFIX/usr/bin/pkgconf" "$PREFIX/usr/bin/pkg-config"

# 2. Configure and build against python3's torch.
TORCH_PREFIX="$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')"
CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}"
BUILD="$ROOT/build-gpu"
run_logged configure cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
  "-DCMAKE_PREFIX_PATH=$TORCH_PREFIX;$PREFIX/usr;$ARCH_LIB/cmake" -DPKG_CONFIG_EXECUTABLE="$(command -v pkg-config)" \
  -DCUDAToolkit_ROOT="$CUDA_HOME" -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" || { tail -n 30 "$OUT_DIR/configure.log"; exit 1; }
run_logged build cmake --build "$BUILD" -j "$(nproc)" --target dsopen-train dsopen-bench-model dsopen-generate \
  dsopen-tokenizer test_cuda test_train || { grep -m 5 -A 5 "error" "$OUT_DIR/build.log"; exit 1; }
BIN="$BUILD/bin"

# 3. CUDA tests: forward/decode/train step against the CPU, offloaded AdamW with pinned memory, the fused kernels,
#    an expert-parallel MoE block split over two threads (the NCCL all-to-all itself needs two GPUs).
run_logged test_cuda "$BIN/test_cuda"
run_logged test_train_cpu "$BIN/test_train"

# 4. CUDA training on the default job's data (fortunes from the carried .debs).
FORTUNES="$PREFIX/usr/share/games/fortunes"
RUNS="$OUT_DIR/runs"
train() {  # train NAME [--set ...]
  local name="$1"; shift
  run_logged "train_$name" "$BIN/dsopen-train" --config "$ROOT/configs/tiny.yaml" --set run.device=cuda \
    --set run.output_dir="$RUNS/$name" --set tokenizer.path="$RUNS/tokenizer.model" \
    --set "tokenizer.train.inputs=[$FORTUNES]" --set "data.train=[$RUNS/data/fortunes_*.bin]" \
    --set "data.build.inputs=[$FORTUNES]" --set data.build.output="$RUNS/data/fortunes" \
    --set train.max_steps=100 --set checkpoint.resume=none "$@"
  tail -n 3 "$OUT_DIR/train_$name.log" | tee -a "$SUMMARY"
}
train fp32 --set train.precision=fp32
train bf16 --set train.precision=bf16
train fp16 --set train.precision=fp16
train zero2_offload --set train.precision=fp32 --set parallel.strategy=zero2 --set parallel.offload_optimizer=cpu
# zero3 on one GPU still gathers and frees every unit (CUDA storage resizes, bf16/fp16 gather buffers, loss scaling).
train zero3_fp32 --set train.precision=fp32 --set parallel.strategy=zero3 --set train.activation_checkpointing=true
train zero3_fp16 --set train.precision=fp16 --set parallel.strategy=zero3
python3 - "$RUNS" <<'PY' | tee -a "$SUMMARY"
import json, sys
def losses(run):
    return [j["loss"] for j in map(json.loads, open(f"{sys.argv[1]}/{run}/metrics.jsonl")) if "loss" in j]
ref = losses("fp32")
for run in ["bf16", "fp16", "zero2_offload", "zero3_fp32", "zero3_fp16"]:
    got = losses(run)
    print(f"{run}: first {got[0]:.4f} last {got[-1]:.4f}; fp32 last {ref[-1]:.4f}; max |dloss| vs fp32 "
          f"{max(abs(a - b) for a, b in zip(got, ref)):.2e}")
PY

# 5. bf16 training throughput vs PyTorch on the same model (and fp32), batch 8 x 1024 on the 125M dense model.
for prec in bf16 fp32; do
  BATCH=8 SEQ=1024 STEPS=10 PRECISIONS=$prec DEVICE=cuda run_logged "bench_$prec" "$ROOT/scripts/bench_train.sh"
  cat "$OUT_DIR/bench_$prec.log" | tee -a "$SUMMARY"
done
say "done; logs in $OUT_DIR"
