// Which kernel a prompt's rows take on this machine: gemv_rows' register tiles or LibTorch's GEMM (MKL sgemm for
// float32 weights, oneDNN's bf16 GEMM for bfloat16 ones), for the decode step's projections (model/decode_step.h).
//
// Up to 32 rows (a full batch of decode steps, dsopen-serve's default --max-num-seqs) the tiles are always used: a
// row's sums run in one fixed order whatever the rows beside it, so a served sequence decodes the same alone or in a
// batch. Past that it is speed alone, and CPUs disagree: on a Zen 4 EPYC the float32 tiles ran 1.1-2.2x MKL up to
// 256 rows and more, on a Xeon with AMX MKL won from 64 (docs/BENCHMARKS.md "Prompt products"). So the crossover
// is measured on the machine, once, and kept in a cache file: every process on the machine (dsopen-serve and
// dsopen-generate alike) then takes the same kernel for the same prompt and computes the same bits; a per-process
// measurement could pick differently in two processes.
//
// The limit is the largest of 64, 128, 256, 512 rows up to which the tiles were at least 5% faster than the GEMM
// at every size measured (32 when none), for products [768 -> 2048] and [2048 -> 768] timed together.
#pragma once

#include <cstdint>
#include <string>

namespace dsopen::model {

// Rows at or below which the tiles run (whatever the machine, 32 rows and fewer always do).
inline constexpr int64_t kTileRowsAlways = 32;

struct TileRows {
  int64_t f32 = kTileRowsAlways;   // float32 weights
  int64_t bf16 = kTileRowsAlways;  // bfloat16 weights
  std::string source;              // where the values came from, for the log: the file, the variable, "measured"
};

// The process-wide limits, resolved on first use: the variable DSOPEN_TILE_ROWS=N (both dtypes; A/B runs), else
// the cache file of this machine (tile_rows_cache_path), else a measurement (~1 s) written there. A cache that
// cannot be written is measured in every process instead, with a warning. Logged once.
const TileRows& tile_rows();

// Replaces the process-wide limits (tests, benchmarks); values below kTileRowsAlways are raised to it.
void set_tile_rows(int64_t f32, int64_t bf16);

// The measurement itself, on the calling thread with LibTorch's current thread count.
TileRows measure_tile_rows();

// The cache file for this machine under `cache_dir`: its name carries a hash of what decides the crossover (the
// CPU's model name, the GEMV's instruction set, the LibTorch version, the probe's version, and ATEN_CPU_CAPABILITY,
// MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA when set), written inside too.
std::string tile_rows_cache_path(const std::string& cache_dir);

// Reads the cache file under `cache_dir`, or measures and writes it (under an flock, so that processes starting
// together measure once); an unreadable or stale file is measured again and replaced. Throws only when measuring.
TileRows load_or_measure_tile_rows(const std::string& cache_dir);

// $DSOPEN_CACHE, else $XDG_CACHE_HOME/dsopen, else $HOME/.cache/dsopen ("" when none is set).
std::string dsopen_cache_dir();

}  // namespace dsopen::model
