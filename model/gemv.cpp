#include "model/gemv.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

// GCC 12's AVX-512 header builds its "undefined" vectors as `__m512i __Y = __Y;`, which -Wmaybe-uninitialized
// reports wherever the widening loads inline (a known false positive of the header, not of this file).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "utils/errors.h"

namespace dsopen::model {

namespace {

// One weight row (float32 or bfloat16 bits) dotted with `rows` activation rows; y[r * out] += ... per row.
// Each ISA version is compiled for its instruction set only (function target attributes), and picked at run time.

float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename W>
float load_scalar(const W* w, int64_t i) {
  if constexpr (std::is_same_v<W, float>) return w[i];
  else return bf16_to_float(w[i]);
}

template <typename W>
void rows_portable(const W* w, const float* x, int64_t rows, int64_t in, float* y, int64_t out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * in;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;
    for (; i + 4 <= in; i += 4) {
      s0 += load_scalar(w, i) * xr[i];
      s1 += load_scalar(w, i + 1) * xr[i + 1];
      s2 += load_scalar(w, i + 2) * xr[i + 2];
      s3 += load_scalar(w, i + 3) * xr[i + 3];
    }
    for (; i < in; ++i) s0 += load_scalar(w, i) * xr[i];
    y[r * out] = (s0 + s1) + (s2 + s3);
  }
}

// Output rows [o_begin, o_end) for every activation row, in blocks of O weight rows (a partial last block repeats
// its last row and drops the extra results), each block against the activation rows R at a time while its weight
// rows stay in L1. While one block's tiles run, the next block's weights are prefetched into L1, a share per tile:
// a model larger than the caches streams its weights from memory every step, and with many rows per block the
// hardware prefetcher, which follows each weight row only while it is being read, leaves the first tile of every
// block waiting on memory (measured: the weight loads took half of the tile's time for the tiny model's 8000-row
// head). tile(n, wp, xp, res) sets res[k][o] = xp[k] . wp[o] for the first n <= R rows (xp padded by repeating the
// last row). Inlined into each instruction set's caller, so that its tiles inline there too.
template <int R, int O, typename W, typename Tile>
__attribute__((always_inline)) inline void for_each_block(const W* w, const float* x, int64_t rows, int64_t in,
                                                          int64_t out, const float* bias, float* y, int64_t o_begin,
                                                          int64_t o_end, Tile&& tile) {
  const int64_t tiles = (rows + R - 1) / R;
  for (int64_t o0 = o_begin; o0 < o_end; o0 += O) {
    const int64_t valid = std::min<int64_t>(O, o_end - o0);
    const W* wp[O];
    for (int64_t o = 0; o < O; ++o) wp[o] = w + (o0 + std::min<int64_t>(o, valid - 1)) * in;
    // The next block's bytes (its rows are contiguous after this block's), in cache lines, spread over the tiles.
    const char* next = reinterpret_cast<const char*>(w + (o0 + O) * in);
    const int64_t lines = o0 + O < o_end ? (std::min<int64_t>(O, o_end - o0 - O) * in * int64_t(sizeof(W)) + 63) / 64 : 0;
    for (int64_t r = 0; r < rows; r += R) {
      const int64_t n = std::min<int64_t>(R, rows - r), t = r / R;
      for (int64_t l = lines * t / tiles; l < lines * (t + 1) / tiles; ++l)
        _mm_prefetch(next + l * 64, _MM_HINT_T0);
      const float* xp[R];
      for (int64_t k = 0; k < R; ++k) xp[k] = x + (r + std::min<int64_t>(k, n - 1)) * in;
      float res[R][O];
      tile(n, wp, xp, res);
      for (int64_t k = 0; k < n; ++k)
        for (int64_t o = 0; o < valid; ++o) y[(r + k) * out + o0 + o] = res[k][o] + (bias ? bias[o0 + o] : 0.0f);
    }
  }
}

template <typename W>
__attribute__((target("avx2,fma"))) __m256 load8(const W* w) {
  if constexpr (std::is_same_v<W, float>) return _mm256_loadu_ps(w);
  else if constexpr (std::is_same_v<W, int8_t>)  // per-channel int8 codes, widened in registers
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
  else {  // 8 bf16 -> 8 float: the bits shifted into the top half of each lane
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// AVX2 + FMA tiles: the AVX-512 scheme below on 8-wide registers, of which there are 16. Each (row, output) pair
// sums into four accumulators (8-column steps k, k + 4, k + 8, ... into accumulator k), so that a lone pair (one
// sequence decoding) has four independent FMA chains, and a tile is 1 activation row x 3 weight rows (12
// accumulators + 3 weight operands + 1 activation operand): each activation load feeds 3 FMAs. Measured with AVX2
// code on the EPYC box, one thread, weights from memory, GFLOP/s for 1 / 2 / 8 / 32 rows of [768 -> 2048]:
// float32 13.0 / 25.9 / 38.3 / 71.3 with this shape, 11.9 / 22.6 / 30.4 / 67.5 with two accumulators in 3 x 2
// tiles, 11.1 / 20.6 / 37.9 / 49.5 with four in 3 x 1 tiles; the former one dot per (row, output) ~11 / 20 / 27 / 43.
// bfloat16 weights: 23.6 / 44.1 / 51.2 / 54.8 against 21.8 / 25.6 / 59.8 / 71.5 for the 3 x 2 tiles (which widen
// each weight once for 3 rows; decoding few sequences is what matters most). The last in % 32 columns are
// zero-padded to a full step; then per pair the accumulators are added as (a0 + a1) + (a2 + a3) and the 8 lanes
// summed in one fixed order (hadd pairs, then the two 128-bit halves). Every pair runs the same instructions whatever the tile's shape:
// a row's bits never depend on the rows beside it.
__attribute__((target("avx2,fma"))) inline __m128 reduce4_avx2(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

inline constexpr int kAvx2Acc = 4;

template <typename W, int O>
__attribute__((target("avx2,fma"), always_inline)) inline void tile_step_avx2(__m256 (&a)[O][kAvx2Acc],
                                                                             const W* const* w, const float* x,
                                                                             int64_t i) {
#pragma GCC unroll 4
  for (int k = 0; k < kAvx2Acc; ++k) {
    const __m256 xv = _mm256_loadu_ps(x + i + 8 * k);
#pragma GCC unroll 3
    for (int o = 0; o < O; ++o) a[o][k] = _mm256_fmadd_ps(load8(w[o] + i + 8 * k), xv, a[o][k]);
  }
}

// res[o] = x . w_o for O <= 3 weight rows.
template <typename W, int O>
__attribute__((target("avx2,fma"))) void tile_avx2(const W* const* w, const float* x, int64_t in, float* res) {
  constexpr int64_t step = 8 * kAvx2Acc;
  __m256 a[O][kAvx2Acc];
#pragma GCC unroll 3
  for (int o = 0; o < O; ++o)
#pragma GCC unroll 4
    for (int k = 0; k < kAvx2Acc; ++k) a[o][k] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + step <= in; i += step) tile_step_avx2<W, O>(a, w, x, i);
  if (i < in) {  // the last in % step columns, zero-padded to a full step
    W wt[O][step] = {};
    float xt[step] = {};
    const W* wp[O];
    for (int o = 0; o < O; ++o) {
      std::memcpy(wt[o], w[o] + i, static_cast<size_t>(in - i) * sizeof(W));
      wp[o] = wt[o];
    }
    std::memcpy(xt, x + i, static_cast<size_t>(in - i) * sizeof(float));
    tile_step_avx2<W, O>(a, wp, xt, 0);
  }
  __m256 s[O];
#pragma GCC unroll 3
  for (int o = 0; o < O; ++o) s[o] = _mm256_add_ps(_mm256_add_ps(a[o][0], a[o][1]), _mm256_add_ps(a[o][2], a[o][3]));
  if (O == 1) {  // reduce4_avx2's order for one accumulator, with one hadd fewer
    const __m256 h = _mm256_hadd_ps(s[0], s[0]), hh = _mm256_hadd_ps(h, h);
    res[0] = _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(hh), _mm256_extractf128_ps(hh, 1)));
    return;
  }
  alignas(16) float sums[4];
  _mm_store_ps(sums, reduce4_avx2(s[0], s[O > 1 ? 1 : 0], s[O > 2 ? 2 : 0], s[O > 2 ? 2 : 0]));
  for (int o = 0; o < O; ++o) res[o] = sums[o];
}

// Decode rows past kAvx2StreamRows: blocks of 3 weight rows, each row of x against them in one tile.
template <typename W>
__attribute__((target("avx2,fma"))) void blocks_avx2(const W* w, const float* x, int64_t rows, int64_t in, int64_t out,
                                                     const float* bias, float* y, int64_t o_begin, int64_t o_end) {
  for_each_block<1, 3>(w, x, rows, in, out, bias, y, o_begin, o_end,
                       [in](int64_t, const W* const* wp, const float* const* xp, float (*res)[3]) {
                         tile_avx2<W, 3>(wp, xp[0], in, res[0]);
                       });
}

// A prompt's rows past kPromptRowsAvx2 (more than any decode batch: model/tile_rows.h's 32, which always take the
// tiles above): no decode row's bits to match, so a tile of 4 rows x 3 weight rows with one accumulator per pair
// (12 accumulators, 3 weight and 1 activation operands: 7 loads per 12 FMAs, against 4 per 3 in the 1 x 3 tiles).
// The same fixed order per row whatever the rows beside it; the tiles/GEMM probe measures this path for prompts.
inline constexpr int64_t kPromptRowsAvx2 = 32;

template <typename W, int R>
__attribute__((target("avx2,fma"), always_inline)) inline void prompt_step_avx2(__m256 (&a)[R][3], const W* const* w,
                                                                               const float* const* x, int64_t i) {
  const __m256 w0 = load8(w[0] + i), w1 = load8(w[1] + i), w2 = load8(w[2] + i);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m256 xv = _mm256_loadu_ps(x[r] + i);
    a[r][0] = _mm256_fmadd_ps(w0, xv, a[r][0]);
    a[r][1] = _mm256_fmadd_ps(w1, xv, a[r][1]);
    a[r][2] = _mm256_fmadd_ps(w2, xv, a[r][2]);
  }
}

template <typename W, int R>
__attribute__((target("avx2,fma"))) void prompt_tile_avx2(const W* const* w, const float* const* x, int64_t in,
                                                          float (*res)[3]) {
  __m256 a[R][3];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = a[r][2] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) prompt_step_avx2<W, R>(a, w, x, i);
  if (i < in) {  // the last in % 8 columns, zero-padded
    W wt[3][8] = {};
    float xt[R][8] = {};
    const W* wp[3];
    const float* xp[R];
    for (int o = 0; o < 3; ++o) std::memcpy(wt[o], w[o] + i, static_cast<size_t>(in - i) * sizeof(W)), wp[o] = wt[o];
    for (int r = 0; r < R; ++r) std::memcpy(xt[r], x[r] + i, static_cast<size_t>(in - i) * sizeof(float)), xp[r] = xt[r];
    prompt_step_avx2<W, R>(a, wp, xp, 0);
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    alignas(16) float sums[4];
    _mm_store_ps(sums, reduce4_avx2(a[r][0], a[r][1], a[r][2], a[r][2]));
    res[r][0] = sums[0], res[r][1] = sums[1], res[r][2] = sums[2];
  }
}

template <typename W>
__attribute__((target("avx2,fma"))) void prompt_blocks_avx2(const W* w, const float* x, int64_t rows, int64_t in,
                                                            int64_t out, const float* bias, float* y, int64_t o_begin,
                                                            int64_t o_end) {
  for_each_block<4, 3>(w, x, rows, in, out, bias, y, o_begin, o_end,
                       [in](int64_t n, const W* const* wp, const float* const* xp, float (*res)[3]) {
                         if (n == 4) prompt_tile_avx2<W, 4>(wp, xp, in, res);
                         else if (n == 3) prompt_tile_avx2<W, 3>(wp, xp, in, res);
                         else if (n == 2) prompt_tile_avx2<W, 2>(wp, xp, in, res);
                         else prompt_tile_avx2<W, 1>(wp, xp, in, res);
                       });
}

// A few activation rows (up to kAvx2StreamRows: decoding one or a few sequences), one weight row at a time, each
// dotted with every row while it is in L1: a single sequential stream, which is what the hardware prefetcher
// follows best (row_avx512's reason, below; measured with AVX2 code on the EPYC box, 2 threads, weights from
// memory, 4 rows of [768 -> 2048]: 64-77 GFLOP/s this way, 47 in blocks of weight rows).
inline constexpr int64_t kAvx2StreamRows = 4;

template <typename W>
__attribute__((target("avx2,fma"))) void rows_avx2(const W* w, const float* x, int64_t rows, int64_t in, int64_t out,
                                                   const float* bias, float* y, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const W* wp[1] = {w + o * in};
    for (int64_t r = 0; r < rows; ++r) {
      float res;
      tile_avx2<W, 1>(wp, x + r * in, in, &res);
      y[r * out + o] = res + (bias ? bias[o] : 0.0f);
    }
  }
}

template <typename W>
__attribute__((target("avx512f"))) __m512 load16(const W* w) {
  if constexpr (std::is_same_v<W, float>) return _mm512_loadu_ps(w);
  else if constexpr (std::is_same_v<W, int8_t>)  // per-channel int8 codes, widened in registers
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
  else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// The two 256-bit halves of v added.
__attribute__((target("avx512f"))) inline __m256 half(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

// The 4 sums of 4 accumulators' 16 lanes each, always in this order: halves added (8 lanes), then pairs, pairs of
// pairs, and the two 128-bit halves. A lone output is summed by the same code (so its bits are the same).
__attribute__((target("avx512f"))) inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(half(a0), half(a1)), _mm256_hadd_ps(half(a2), half(a3)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// A tile of R activation rows x O weight rows (O = 4; 1 for a lone weight row): res[r][o] = x_r . w_o. One
// accumulator per (row, output) over 16-wide steps of `in` (a zero-padded last step when in % 16 != 0), then
// reduce4 (for O = 1 with the one accumulator in all four places: its sum in every lane). Per step: O weight loads
// and R activation loads feed O * R FMAs, so at R = O = 4 the FMA units, not the loads, set the pace (16
// accumulators + 8 operands of the 32 registers). Every (row, output) pair runs the same instructions whatever R
// and O are and wherever it sits in the batch: a row's result never depends on the rows beside it.
template <typename W, int R, int O>
__attribute__((target("avx512f"), always_inline)) inline void tile_step(__m512 (&a)[R][O], const W* const* w,
                                                                       const float* const* x, int64_t i) {
  __m512 wv[O];
#pragma GCC unroll 4
  for (int o = 0; o < O; ++o) wv[o] = load16(w[o] + i);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m512 xv = _mm512_loadu_ps(x[r] + i);
#pragma GCC unroll 4
    for (int o = 0; o < O; ++o) a[r][o] = _mm512_fmadd_ps(wv[o], xv, a[r][o]);
  }
}

template <typename W, int R, int O = 4>
__attribute__((target("avx512f"))) void tile_avx512(const W* const* w, const float* const* x, int64_t in,
                                                    float (*res)[4]) {
  __m512 a[R][O];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int o = 0; o < O; ++o) a[r][o] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= in; i += 16) tile_step<W, R, O>(a, w, x, i);
  if (i < in) {  // the last in % 16 columns, zero-padded to a full step
    W wt[O][16] = {};
    float xt[R][16] = {};
    const W* wp[O];
    const float* xp[R];
    for (int o = 0; o < O; ++o) {
      std::memcpy(wt[o], w[o] + i, static_cast<size_t>(in - i) * sizeof(W));
      wp[o] = wt[o];
    }
    for (int r = 0; r < R; ++r) {
      std::memcpy(xt[r], x[r] + i, static_cast<size_t>(in - i) * sizeof(float));
      xp[r] = xt[r];
    }
    tile_step<W, R, O>(a, wp, xp, 0);
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
    _mm_storeu_ps(res[r], reduce4(a[r][0], a[r][O > 1 ? 1 : 0], a[r][O > 2 ? 2 : 0], a[r][O > 3 ? 3 : 0]));
}

// Output blocks [b0, b1) of 4 rows in 4 x 4 tiles (for_each_block).
template <typename W>
__attribute__((target("avx512f"))) void blocks_avx512(const W* w, const float* x, int64_t rows, int64_t in,
                                                      int64_t out, const float* bias, float* y, int64_t b0,
                                                      int64_t b1) {
  for_each_block<4, 4>(w, x, rows, in, out, bias, y, b0 * 4, std::min(b1 * 4, out),
                       [in](int64_t n, const W* const* wp, const float* const* xp, float (*res)[4]) {
                         if (n == 4) tile_avx512<W, 4>(wp, xp, in, res);
                         else if (n == 3) tile_avx512<W, 3>(wp, xp, in, res);
                         else if (n == 2) tile_avx512<W, 2>(wp, xp, in, res);
                         else tile_avx512<W, 1>(wp, xp, in, res);
                       });
}

// One activation row against long weight rows (kLongRowBytes and more), one weight row at a time. Decoding one
// sequence is a pure stream of weights from memory, and a single sequential stream is what the hardware prefetcher
// follows best: measured on the EPYC box, one thread, weights from memory, [768 -> 2048] 15.9 GB/s in blocks of 4
// rows (with the block prefetch) against 20.4 one row at a time, [2048 -> 768] 18.5 against 19.7; at 1 KiB rows
// (256 inputs) the blocks win (21.5 against 16.9 for the tiny head). The same tile with one weight row, so a
// row's bits are the same here, in a tile, alone or in a batch.
inline constexpr int64_t kLongRowBytes = 1536;

template <typename W>
__attribute__((target("avx512f"))) void row_avx512(const W* w, const float* x, int64_t in, const float* bias, float* y,
                                                   int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const W* wp[1] = {w + o * in};
    float res[1][4];
    tile_avx512<W, 1, 1>(wp, &x, in, res);
    y[o] = res[0][0] + (bias ? bias[o] : 0.0f);
  }
}

enum class Isa { kPortable, kAvx2, kAvx512 };

Isa detect() {
  __builtin_cpu_init();
  const Isa best = __builtin_cpu_supports("avx512f")                                       ? Isa::kAvx512
                   : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::kAvx2
                                                                                     : Isa::kPortable;
  // DSOPEN_GEMV_ISA: a lesser instruction set than the CPU's best, to see what a CPU without it gets (A/B runs).
  const char* v = std::getenv("DSOPEN_GEMV_ISA");
  if (!v || !*v) return best;
  const std::string want = v;
  const Isa asked = want == "avx512" ? Isa::kAvx512 : want == "avx2" ? Isa::kAvx2 : Isa::kPortable;
  if (want != "avx512" && want != "avx2" && want != "portable")
    throw usage_error("DSOPEN_GEMV_ISA", "'" + want + "' is not an instruction set", "use avx512, avx2 or portable");
  if (static_cast<int>(asked) > static_cast<int>(best))
    throw usage_error("DSOPEN_GEMV_ISA", "this CPU cannot run " + want, "unset it or ask for a lesser one");
  return asked;
}

Isa isa() {
  static const Isa i = detect();
  return i;
}

// ---- P . V over a cache ------------------------------------------------------------------------------------------

// The last columns [j0, n) of pv_rows_*: the same terms in the same order, one fma each.
template <typename W, int R>
void pv_tail(const float* const* p, int64_t T, const W* V, int64_t ldv, int64_t j0, int64_t n, float* const* y) {
  for (int64_t j = j0; j < n; ++j)
    for (int r = 0; r < R; ++r) {
      float s = 0.0f;
      for (int64_t t = 0; t < T; ++t) s = std::fma(p[r][t], load_scalar(V, t * ldv + j), s);
      y[r][j] = s;
    }
}

// y[r, j0 + L*J) = sum_t p[r, t] * V[t, j0 + L*J) for R rows of p, L the vector width (16 floats with AVX-512, 8
// with AVX2): R x J accumulators (16 at R = J = 4 with AVX-512, 8 at R = 4, J = 2 with AVX2) while each V row's
// L*J values are loaded once for all R rows (p[r, t] broadcast). t runs in order, one FMA per term: the same bits
// on every instruction set. pv_rows_* runs the tiles over n columns, J_MAIN vectors wide, then one vector, then
// pv_tail.
#define DSOPEN_PV_KERNELS(S, TARGET, VEC, L, J_MAIN, SETZERO, LOAD, SET1, FMADD, STOREU)                         \
  template <typename W, int R, int J>                                                                             \
  __attribute__((target(TARGET))) void pv_tile_##S(const float* const* p, int64_t T, const W* V, int64_t ldv,    \
                                                   int64_t j0, float* const* y) {                                \
    VEC a[R][J];                                                                                                  \
    _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r)                                                           \
      _Pragma("GCC unroll 4") for (int j = 0; j < J; ++j) a[r][j] = SETZERO();                                    \
    for (int64_t t = 0; t < T; ++t) {                                                                             \
      const W* vt = V + t * ldv + j0;                                                                             \
      VEC v[J];                                                                                                   \
      _Pragma("GCC unroll 4") for (int j = 0; j < J; ++j) v[j] = LOAD(vt + L * j);                                \
      _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r) {                                                       \
        const VEC pr = SET1(p[r][t]);                                                                             \
        _Pragma("GCC unroll 4") for (int j = 0; j < J; ++j) a[r][j] = FMADD(pr, v[j], a[r][j]);                   \
      }                                                                                                           \
    }                                                                                                             \
    _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r)                                                           \
      _Pragma("GCC unroll 4") for (int j = 0; j < J; ++j) STOREU(y[r] + j0 + L * j, a[r][j]);                     \
  }                                                                                                               \
  template <typename W, int R>                                                                                    \
  __attribute__((target(TARGET))) void pv_rows_##S(const float* const* p, int64_t T, const W* V, int64_t ldv,    \
                                                   int64_t n, float* const* y) {                                 \
    int64_t j = 0;                                                                                                \
    for (; j + L * J_MAIN <= n; j += L * J_MAIN) pv_tile_##S<W, R, J_MAIN>(p, T, V, ldv, j, y);                   \
    for (; j + L <= n; j += L) pv_tile_##S<W, R, 1>(p, T, V, ldv, j, y);                                          \
    pv_tail<W, R>(p, T, V, ldv, j, n, y);                                                                         \
  }

DSOPEN_PV_KERNELS(avx512, "avx512f", __m512, 16, 4, _mm512_setzero_ps, load16, _mm512_set1_ps, _mm512_fmadd_ps,
                  _mm512_storeu_ps)
DSOPEN_PV_KERNELS(avx2, "avx2,fma", __m256, 8, 2, _mm256_setzero_ps, load8, _mm256_set1_ps, _mm256_fmadd_ps,
                  _mm256_storeu_ps)
#undef DSOPEN_PV_KERNELS

template <typename W>
void pv_portable(const float* p, int64_t rows, int64_t T, const W* V, int64_t ldv, int64_t n, float* y) {
  std::fill(y, y + rows * n, 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = 0; t < T; ++t) {
      const float pt = p[r * T + t];
      for (int64_t j = 0; j < n; ++j) y[r * n + j] = std::fma(pt, load_scalar(V, t * ldv + j), y[r * n + j]);
    }
}

template <typename W>
void pv(Isa which, const float* p, int64_t rows, int64_t T, const W* V, int64_t ldv, int64_t n, float* y) {
  if (which == Isa::kPortable) return pv_portable(p, rows, T, V, ldv, n, y);
  for (int64_t r = 0; r < rows; r += 4) {
    const int64_t k = std::min<int64_t>(4, rows - r);
    const float* pr[4];
    float* yr[4];
    for (int64_t i = 0; i < k; ++i) pr[i] = p + (r + i) * T, yr[i] = y + (r + i) * n;
    if (which == Isa::kAvx512) {
      if (k == 4) pv_rows_avx512<W, 4>(pr, T, V, ldv, n, yr);
      else if (k == 3) pv_rows_avx512<W, 3>(pr, T, V, ldv, n, yr);
      else if (k == 2) pv_rows_avx512<W, 2>(pr, T, V, ldv, n, yr);
      else pv_rows_avx512<W, 1>(pr, T, V, ldv, n, yr);
    } else {
      if (k == 4) pv_rows_avx2<W, 4>(pr, T, V, ldv, n, yr);
      else if (k == 3) pv_rows_avx2<W, 3>(pr, T, V, ldv, n, yr);
      else if (k == 2) pv_rows_avx2<W, 2>(pr, T, V, ldv, n, yr);
      else pv_rows_avx2<W, 1>(pr, T, V, ldv, n, yr);
    }
  }
}

// Output rows [b0 * 4, min(b1 * 4, out)) on the calling thread, in the instruction set `which`.
template <typename W>
void blocks(Isa which, const W* w, const float* x, int64_t rows, int64_t in, int64_t out, const float* bias, float* y,
            int64_t b0, int64_t b1) {
  if (which == Isa::kAvx512) {
    if (rows == 1 && in * int64_t(sizeof(W)) >= kLongRowBytes)
      return row_avx512(w, x, in, bias, y, b0 * 4, std::min(b1 * 4, out));
    return blocks_avx512(w, x, rows, in, out, bias, y, b0, b1);
  }
  if (which == Isa::kAvx2) {
    if (rows <= kAvx2StreamRows) return rows_avx2(w, x, rows, in, out, bias, y, b0 * 4, std::min(b1 * 4, out));
    if (rows > kPromptRowsAvx2) return prompt_blocks_avx2(w, x, rows, in, out, bias, y, b0 * 4, std::min(b1 * 4, out));
    return blocks_avx2(w, x, rows, in, out, bias, y, b0 * 4, std::min(b1 * 4, out));
  }
  for (int64_t o = b0 * 4; o < std::min(b1 * 4, out); ++o) {
    const W* wo = w + o * in;
    rows_portable(wo, x, rows, in, y + o, out);
    if (bias)
      for (int64_t r = 0; r < rows; ++r) y[r * out + o] += bias[o];
  }
}

template <typename W>
void run(Isa which, const W* w, const float* x, int64_t rows, int64_t in, int64_t out, const float* bias, float* y) {
  // ~128 KiB of weights per task at least: enough work to pay for waking a thread (measured on 2 cores: 32-512 KiB
  // within noise of each other on the dense 97M and tiny MoE models, docs/BENCHMARKS.md "llama.cpp").
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, in * int64_t(sizeof(W))));
  at::parallel_for(0, (out + 3) / 4, std::max<int64_t>(1, grain / 4), [&](int64_t b0, int64_t b1) {
    blocks(which, w, x, rows, in, out, bias, y, b0, b1);
  });
}

// ---- weight-only int8 ------------------------------------------------------------------------------------------

// sum_i codes[i] * x[i] for one int8 row.
__attribute__((target("avx512f"))) float dot_i8_avx512(const int8_t* c, const float* x, int64_t in) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= in; i += 32) {
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + i))));
    const __m512 w1 =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + i + 16))));
    a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i), a0);
    a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i + 16), a1);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  for (; i < in; ++i) s += static_cast<float>(c[i]) * x[i];
  return s;
}

float dot_i8_portable(const int8_t* c, const float* x, int64_t in) {
  float s0 = 0, s1 = 0;
  int64_t i = 0;
  for (; i + 2 <= in; i += 2) s0 += static_cast<float>(c[i]) * x[i], s1 += static_cast<float>(c[i + 1]) * x[i + 1];
  for (; i < in; ++i) s0 += static_cast<float>(c[i]) * x[i];
  return s0 + s1;
}

}  // namespace

const char* gemv_isa() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "portable";
  }
}

bool gemv_enabled() {
  static const bool enabled = [] {  // DSOPEN_GEMV=0: LibTorch's kernels everywhere (A/B measurements, debugging)
    const char* v = std::getenv("DSOPEN_GEMV");
    return !(v && std::string(v) == "0");
  }();
  return enabled;
}

bool gemv_applies(const torch::Tensor& x, const torch::Tensor& W) {
  if (!gemv_enabled() || !x.device().is_cpu() || !W.device().is_cpu() || torch::GradMode::is_enabled()) return false;
  if (x.scalar_type() != torch::kFloat32 && x.scalar_type() != torch::kBFloat16) return false;
  if (x.dim() < 1 || W.dim() != 2 || !W.is_contiguous()) return false;
  if (W.scalar_type() != torch::kFloat32 && W.scalar_type() != torch::kBFloat16) return false;
  return x.size(-1) == W.size(1) && x.numel() / W.size(1) <= kMaxGemvRows && x.numel() > 0;
}

namespace {
Isa pick(const char* isa_name) {
  if (!isa_name) return isa();
  const std::string n = isa_name;
  const Isa which = n == "avx512" ? Isa::kAvx512 : n == "avx2" ? Isa::kAvx2 : Isa::kPortable;
  const bool has = which == Isa::kPortable || (which == Isa::kAvx2 && isa() != Isa::kPortable) || which == isa();
  TORCH_CHECK(has, "gemv: this CPU cannot run ", n);
  return which;
}
}  // namespace

void gemv_rows(const float* x, int64_t rows, int64_t in, const void* W, bool w_bf16, int64_t out, const float* bias,
               float* y) {
  if (w_bf16) run(isa(), static_cast<const uint16_t*>(W), x, rows, in, out, bias, y);
  else run(isa(), static_cast<const float*>(W), x, rows, in, out, bias, y);
}

void gemv_rows_serial(const float* x, int64_t rows, int64_t in, const void* W, bool w_bf16, int64_t out, float* y) {
  const int64_t nblocks = (out + 3) / 4;
  if (w_bf16) blocks(isa(), static_cast<const uint16_t*>(W), x, rows, in, out, nullptr, y, 0, nblocks);
  else blocks(isa(), static_cast<const float*>(W), x, rows, in, out, nullptr, y, 0, nblocks);
}

void pv_rows(const float* p, int64_t rows, int64_t T, const void* V, bool v_bf16, int64_t ldv, int64_t n, float* y,
             const char* isa_name) {
  const Isa which = pick(isa_name);
  if (v_bf16) pv(which, p, rows, T, static_cast<const uint16_t*>(V), ldv, n, y);
  else pv(which, p, rows, T, static_cast<const float*>(V), ldv, n, y);
}

namespace {
// gemv_int8_rows in the instruction set `which`.
void int8_rows(Isa which, const float* x, int64_t rows, int64_t in, const int8_t* codes, const float* scale,
               const float* offset, int64_t out, float* y, float* xsum) {
  for (int64_t r = 0; r < rows; ++r) {
    float s = 0;
    for (int64_t i = 0; i < in; ++i) s += x[r * in + i];
    xsum[r] = s;
  }
  if ((which == Isa::kAvx512 && rows > kMaxGemvRows) || which == Isa::kAvx2) {
    // The float tiles of gemv_rows with the codes widened in registers, each block of codes converted once for
    // several rows (one dot per row and output would convert them once per row). AVX-512: a prompt's rows (more
    // than kMaxGemvRows); AVX2: every row count (up to 4 rows one code row at a time, as its float tiles).
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, in));
    at::parallel_for(0, (out + 3) / 4, std::max<int64_t>(1, grain / 4), [&](int64_t b0, int64_t b1) {
      blocks(which, codes, x, rows, in, out, nullptr, y, b0, b1);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t o = b0 * 4; o < std::min(b1 * 4, out); ++o)
          y[r * out + o] = scale[o] * y[r * out + o] + offset[o] * xsum[r];
    });
    return;
  }
  const bool wide = which == Isa::kAvx512;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, in));
  at::parallel_for(0, out, grain, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t r = 0; r < rows; ++r) {
        const float d = wide ? dot_i8_avx512(codes + o * in, x + r * in, in) : dot_i8_portable(codes + o * in, x + r * in, in);
        y[r * out + o] = scale[o] * d + offset[o] * xsum[r];
      }
  });
}
}  // namespace

void gemv_int8_rows(const float* x, int64_t rows, int64_t in, const int8_t* codes, const float* scale,
                    const float* offset, int64_t out, float* y, float* xsum) {
  int8_rows(isa(), x, rows, in, codes, scale, offset, out, y, xsum);
}

torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& bias, const char* isa_name) {
  const Isa which = pick(isa_name);
  const int64_t in = W.size(1), out = W.size(0), rows = x.numel() / in;
  const auto xc = x.to(torch::kFloat32).contiguous();
  auto sizes = x.sizes().vec();
  sizes.back() = out;
  auto y = torch::empty(sizes, x.options().dtype(torch::kFloat32));
  const torch::Tensor b = bias.defined() ? bias.to(torch::kFloat32).contiguous() : torch::Tensor();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  if (W.scalar_type() == torch::kFloat32)
    run(which, W.data_ptr<float>(), xc.data_ptr<float>(), rows, in, out, bp, y.data_ptr<float>());
  else
    run(which, reinterpret_cast<const uint16_t*>(W.data_ptr<at::BFloat16>()), xc.data_ptr<float>(), rows, in, out, bp,
        y.data_ptr<float>());
  return x.scalar_type() == torch::kFloat32 ? y : y.to(x.scalar_type());
}

torch::Tensor gemv_int8(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale,
                        const torch::Tensor& offset, const char* isa_name) {
  const Isa which = pick(isa_name);
  const int64_t in = codes.size(1), out = codes.size(0), rows = x.numel() / in;
  const auto xc = x.to(torch::kFloat32).contiguous().view({rows, in});
  auto y = torch::empty({rows, out}, torch::kFloat32);
  std::vector<float> xsum(static_cast<size_t>(rows));
  int8_rows(which, xc.data_ptr<float>(), rows, in, codes.data_ptr<int8_t>(), scale.data_ptr<float>(),
            offset.data_ptr<float>(), out, y.data_ptr<float>(), xsum.data());
  return y;
}

}  // namespace dsopen::model
