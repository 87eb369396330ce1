#!/usr/bin/env bash
# One-command setup: system packages, Python wheels (LibTorch comes from the torch wheel), CMake configure and a
# Release build into build/ (binaries in build/bin). Idempotent: a second run with nothing to do takes seconds.
#
# Environment: PYTHON (default python3), BUILD_DIR (default build), JOBS (default nproc),
#              DSOPEN_SKIP_APT=1 to skip the system-package step (e.g. without root).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
BUILD_DIR="${BUILD_DIR:-build}"
JOBS="${JOBS:-$(nproc)}"

STEP=""
fail() {
  echo "setup.sh: step '$STEP' failed: $1" >&2
  echo "setup.sh: fix: $2" >&2
  STEP=""
  exit 1
}
step() { STEP="$1"; echo "==> $1"; }
trap 'rc=$?; [ $rc -ne 0 ] && [ -n "$STEP" ] && echo "setup.sh: step \"$STEP\" failed (exit $rc); see the output above" >&2' EXIT

APT_PACKAGES=(build-essential cmake pkg-config ccache git
  libsentencepiece-dev sentencepiece libyaml-cpp-dev libspdlog-dev libcxxopts-dev catch2 nlohmann-json3-dev
  libpcre2-dev libgloo-dev zlib1g-dev clang libclang-rt-dev fortunes fortunes-zh gnuplot-nox
  libgoogle-perftools-dev libcpp-httplib-dev chromium chromium-driver)

step "system packages (apt)"
if [ "${DSOPEN_SKIP_APT:-0}" = "1" ]; then
  echo "    skipped (DSOPEN_SKIP_APT=1)"
else
  missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "    all ${#APT_PACKAGES[@]} packages present"
  else
    echo "    installing: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq || fail "apt-get update failed" "check network access to the Debian mirror"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null ||
      fail "apt-get install failed for: ${missing[*]}" "run: apt-get install ${missing[*]} and read its error"
  fi
fi

step "python packages (pip)"
command -v "$PYTHON" >/dev/null || fail "$PYTHON not found" "install Python 3.9+ or set PYTHON=/path/to/python3"
# Compares installed versions with the pins in requirements.txt without starting pip (fast when all match).
check_pins() {
  "$PYTHON" - "$ROOT/requirements.txt" <<'PY'
import sys, re
from importlib import metadata
bad = []
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
    if not m: continue
    name, want = m.groups()
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have is None or have.split("+")[0] != want: bad.append(f"{name} (have {have}, want {want})")
if bad:
    print("    out of date: " + ", ".join(bad)); sys.exit(1)
PY
}
if check_pins; then
  echo "    requirements.txt satisfied"
else
  "$PYTHON" -m pip install --disable-pip-version-check -q -r requirements.txt ||
    fail "pip install -r requirements.txt failed" "read pip's error above; a proxy or disk-space problem is common"
  check_pins || fail "packages still differ from requirements.txt" "pip install -r requirements.txt --force-reinstall"
fi

step "CMake configure"
TORCH_PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null)" ||
  fail "cannot import torch from $PYTHON" "pip install -r requirements.txt"
CMAKE_ARGS=(-S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=$TORCH_PREFIX"
  "-DPython3_EXECUTABLE=$(command -v "$PYTHON")")
# A CUDA build of LibTorch needs the CUDA toolkit to configure (headers and nvcc); use /usr/local/cuda when present.
if "$PYTHON" -c 'import torch,sys; sys.exit(0 if torch.version.cuda else 1)'; then
  CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
  [ -x "$CUDA_HOME/bin/nvcc" ] ||
    fail "LibTorch has CUDA but no CUDA toolkit was found at $CUDA_HOME" "install the CUDA toolkit or set CUDA_HOME"
  CMAKE_ARGS+=("-DCUDAToolkit_ROOT=$CUDA_HOME" "-DCMAKE_CUDA_COMPILER=$CUDA_HOME/bin/nvcc")
fi
STAMP="$BUILD_DIR/.configure-args"
if [ -f "$BUILD_DIR/CMakeCache.txt" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "${CMAKE_ARGS[*]}" ]; then
  echo "    already configured ($BUILD_DIR)"
else
  cmake "${CMAKE_ARGS[@]}" >"$BUILD_DIR.configure.log" 2>&1 || {
    tail -n 30 "$BUILD_DIR.configure.log" >&2
    fail "cmake configure failed (log: $BUILD_DIR.configure.log)" "read the CMake error above"
  }
  mkdir -p "$BUILD_DIR" && echo "${CMAKE_ARGS[*]}" >"$STAMP"
  rm -f "$BUILD_DIR.configure.log"
  echo "    configured $BUILD_DIR (LibTorch from $TORCH_PREFIX)"
fi

step "build (Release, $JOBS jobs)"
cmake --build "$BUILD_DIR" -j "$JOBS" || fail "the build failed" "read the first compiler error above"

STEP=""
echo "==> done: binaries in $BUILD_DIR/bin"
