// int4 products in the repacked layout (see gemv_int4.h): activation quantization, register tiles per instruction
// set (AVX512-VNNI, AVX512-BW, AVX2), the choice among them, threads over output blocks.
#include "model/gemv_int4.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

// GCC 12's AVX-512 header builds its "undefined" vectors as `__m512i __Y = __Y;`, which -Wmaybe-uninitialized
// reports wherever the intrinsics inline (a known false positive of the header).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "model/gemv.h"

namespace dsopen::model {

Int4Pack pack_int4(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& zeros, int64_t group) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kUInt8, "pack_int4: codes must be uint8 [out, in / 2]");
  const int64_t out = codes.size(0), in = codes.size(1) * 2;
  TORCH_CHECK(group > 0 && in % 32 == 0 && group % 32 == 0 && in % group == 0,
              "pack_int4: needs in % 32 == 0 and groups of a multiple of 32 dividing in (in ", in, ", group ", group, ")");
  const int64_t groups = in / group, blocks = (out + 15) / 16, pad = blocks * 16 - out;
  TORCH_CHECK(scales.sizes() == torch::IntArrayRef({out, groups}) && zeros.sizes() == scales.sizes(),
              "pack_int4: scales and zeros must be [out, in / group]");
  // Column k = 8 s + 4 h + j of output o: nibble h of byte 4 (o % 16) + j in step s of block o / 16.
  auto c = torch::stack({codes.bitwise_and(0x0F), codes.bitwise_right_shift(4)}, 2).view({out, in});
  c = torch::constant_pad_nd(c, {0, 0, 0, pad}).view({blocks, 16, in / 8, 2, 4});
  auto bytes = c.select(3, 0).bitwise_or(c.select(3, 1).bitwise_left_shift(4));  // [blocks, 16, in / 8, 4]
  Int4Pack p;
  p.codes = bytes.permute({0, 2, 1, 3}).contiguous().view({blocks, in / 8, 64});
  auto per_block = [&](const torch::Tensor& t) {  // [out, groups] -> [blocks, groups, 16]
    return torch::constant_pad_nd(t.to(torch::kFloat32), {0, 0, 0, pad}).view({blocks, 16, groups}).permute({0, 2, 1}).contiguous();
  };
  const auto s = scales.to(torch::kFloat32);
  p.scales = per_block(s);
  p.scaled_zeros = per_block(s * zeros.to(torch::kFloat32));
  p.in = in;
  p.out = out;
  p.group = group;
  return p;
}

namespace {

// Activation rows quantized per block of 32 columns: q int8 [rows, in], d [rows, in / 32], and per group
// gsum = sum over its blocks of d * sum(q) [rows, in / group].
struct Int4Activations {
  std::vector<int8_t> q;
  std::vector<float> d, gsum;
};

// AVX2 + FMA (every CPU that runs a kernel below has it). Rounding to nearest even (cvtps under the default MXCSR).
__attribute__((target("avx2,fma"))) void quantize_rows(const float* x, int64_t rows, int64_t in, int64_t group,
                                                       Int4Activations& a) {
  const int64_t blocks = in / 32, groups = in / group;
  a.q.resize(static_cast<size_t>(rows * in));
  a.d.resize(static_cast<size_t>(rows * blocks));
  a.gsum.assign(static_cast<size_t>(rows * groups), 0.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // packs' 128-bit lanes back in column order
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = x + r * in + b * 32;
      __m256 v[4], m = _mm256_setzero_ps();
      for (int k = 0; k < 4; ++k) {
        v[k] = _mm256_loadu_ps(xb + 8 * k);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[k]));
      }
      const __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
      const __m128 m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      const float amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
      const __m256 inv = _mm256_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
      __m256i q[4];
      for (int k = 0; k < 4; ++k) q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], inv));
      const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q.data() + r * in + b * 32),
                          _mm256_permutevar8x32_epi32(bytes, order));
      const __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
      const __m128i s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
      const int32_t sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1)));
      const float db = amax / 127.0f;
      a.d[static_cast<size_t>(r * blocks + b)] = db;
      a.gsum[static_cast<size_t>(r * groups + b * 32 / group)] += db * static_cast<float>(sum);
    }
}

struct Int4Args {
  const uint8_t* codes;
  const float *scales, *scaled_zeros;
  int64_t in, out, group;
  const Int4Activations* a;
  float* y;
};

int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// A tile of R rows (from r0) x V blocks of 16 outputs (from B0). Per block of 32 columns: the exact int32 sums of
// 4 steps x (low, high nibbles) x (4 code bytes x 4 broadcast activation bytes) per lane; then per lane
// acc = fma(float(sum), scale * d, acc); at the end acc -= scale * zero * gsum per group. VNNI: vpdpbusd; BW:
// vpmaddubsw pairs summed in int16 over the block (at most 8 x 2 x 15 x 127 = 30,480: no overflow), then vpmaddwd
// by ones.
#define DSOPEN_INT4_TILE_512(NAME, TARGET, VNNI)                                                                       \
  template <int R, int V>                                                                                             \
  __attribute__((target(TARGET))) inline void NAME(const Int4Args& p, int64_t r0, int64_t B0) {                       \
    const int64_t steps = p.in / 8, blocks = p.in / 32, groups = p.in / p.group;                                      \
    const __m512i low4 = _mm512_set1_epi8(0x0F), ones = _mm512_set1_epi16(1);                                        \
    const int8_t* xq[R];                                                                                              \
    for (int r = 0; r < R; ++r) xq[r] = p.a->q.data() + (r0 + r) * p.in;                                              \
    __m512 acc[R][V];                                                                                                 \
    for (int r = 0; r < R; ++r)                                                                                       \
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();                                                    \
    for (int64_t b = 0; b < blocks; ++b) {                                                                            \
      __m512i is[R][V];                                                                                               \
      for (int r = 0; r < R; ++r)                                                                                     \
        for (int v = 0; v < V; ++v) is[r][v] = _mm512_setzero_si512();                                                \
      _Pragma("GCC unroll 4") for (int s = 0; s < 4; ++s) {                                                           \
        __m512i lo[V], hi[V];                                                                                         \
        for (int v = 0; v < V; ++v) {                                                                                 \
          const __m512i w = _mm512_loadu_si512(p.codes + ((B0 + v) * steps + b * 4 + s) * 64);                         \
          lo[v] = _mm512_and_si512(w, low4);                                                                          \
          hi[v] = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);                                                    \
        }                                                                                                             \
        for (int r = 0; r < R; ++r) {                                                                                 \
          const __m512i x0 = _mm512_set1_epi32(load4(xq[r] + b * 32 + s * 8));                                         \
          const __m512i x1 = _mm512_set1_epi32(load4(xq[r] + b * 32 + s * 8 + 4));                                     \
          for (int v = 0; v < V; ++v) {                                                                               \
            if constexpr (VNNI)                                                                                       \
              is[r][v] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(is[r][v], lo[v], x0), hi[v], x1);                    \
            else                                                                                                      \
              is[r][v] = _mm512_add_epi16(is[r][v], _mm512_add_epi16(_mm512_maddubs_epi16(lo[v], x0),                 \
                                                                     _mm512_maddubs_epi16(hi[v], x1)));               \
          }                                                                                                           \
        }                                                                                                             \
      }                                                                                                               \
      const int64_t g = b * 32 / p.group;                                                                             \
      for (int v = 0; v < V; ++v) {                                                                                   \
        const __m512 ws = _mm512_loadu_ps(p.scales + ((B0 + v) * groups + g) * 16);                                   \
        for (int r = 0; r < R; ++r) {                                                                                 \
          const __m512i sum = VNNI ? is[r][v] : _mm512_madd_epi16(is[r][v], ones);                                    \
          const __m512 dv = _mm512_set1_ps(p.a->d[(r0 + r) * blocks + b]);                                           \
          acc[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(ws, dv), acc[r][v]);                     \
        }                                                                                                             \
      }                                                                                                               \
    }                                                                                                                 \
    for (int64_t g = 0; g < groups; ++g)                                                                              \
      for (int v = 0; v < V; ++v) {                                                                                   \
        const __m512 sz = _mm512_loadu_ps(p.scaled_zeros + ((B0 + v) * groups + g) * 16);                             \
        for (int r = 0; r < R; ++r)                                                                                   \
          acc[r][v] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(p.a->gsum[(r0 + r) * groups + g]), acc[r][v]);              \
      }                                                                                                               \
    for (int v = 0; v < V; ++v) {                                                                                     \
      const int64_t o0 = (B0 + v) * 16, n = std::min<int64_t>(16, p.out - o0);                                       \
      const __mmask16 m = n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);                                    \
      for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(p.y + (r0 + r) * p.out + o0, m, acc[r][v]);                   \
    }                                                                                                                 \
  }

DSOPEN_INT4_TILE_512(tile_vnni, "avx512f,avx512bw,avx512vnni", true)
DSOPEN_INT4_TILE_512(tile_bw, "avx512f,avx512bw", false)
#undef DSOPEN_INT4_TILE_512

// The same with AVX2 (16 registers of 8 lanes): each block of 16 outputs as two halves of 8, vpmaddubsw pairs summed
// in int16 over the block as the BW tile does; the same float operations per lane.
template <int R, int V>
__attribute__((target("avx2,fma"))) inline void tile_avx2(const Int4Args& p, int64_t r0, int64_t B0) {
  const int64_t steps = p.in / 8, blocks = p.in / 32, groups = p.in / p.group;
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int8_t* xq[R];
  for (int r = 0; r < R; ++r) xq[r] = p.a->q.data() + (r0 + r) * p.in;
  __m256 acc[R][2 * V];
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2 * V; ++h) acc[r][h] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i is[R][2 * V];
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < 2 * V; ++h) is[r][h] = _mm256_setzero_si256();
    _Pragma("GCC unroll 4") for (int s = 0; s < 4; ++s) {
      __m256i x0[R], x1[R];
      for (int r = 0; r < R; ++r) {
        x0[r] = _mm256_set1_epi32(load4(xq[r] + b * 32 + s * 8));
        x1[r] = _mm256_set1_epi32(load4(xq[r] + b * 32 + s * 8 + 4));
      }
      for (int h = 0; h < 2 * V; ++h) {
        const __m256i w = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(p.codes + ((B0 + h / 2) * steps + b * 4 + s) * 64 + 32 * (h % 2)));
        const __m256i lo = _mm256_and_si256(w, low4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low4);
        for (int r = 0; r < R; ++r)
          is[r][h] = _mm256_add_epi16(is[r][h], _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0[r]),
                                                                 _mm256_maddubs_epi16(hi, x1[r])));
      }
    }
    const int64_t g = b * 32 / p.group;
    for (int h = 0; h < 2 * V; ++h) {
      const __m256 ws = _mm256_loadu_ps(p.scales + ((B0 + h / 2) * groups + g) * 16 + 8 * (h % 2));
      for (int r = 0; r < R; ++r) {
        const __m256 dv = _mm256_set1_ps(p.a->d[(r0 + r) * blocks + b]);
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(is[r][h], ones)), _mm256_mul_ps(ws, dv),
                                    acc[r][h]);
      }
    }
  }
  for (int64_t g = 0; g < groups; ++g)
    for (int h = 0; h < 2 * V; ++h) {
      const __m256 sz = _mm256_loadu_ps(p.scaled_zeros + ((B0 + h / 2) * groups + g) * 16 + 8 * (h % 2));
      for (int r = 0; r < R; ++r)
        acc[r][h] = _mm256_fnmadd_ps(sz, _mm256_set1_ps(p.a->gsum[(r0 + r) * groups + g]), acc[r][h]);
    }
  for (int h = 0; h < 2 * V; ++h) {
    const int64_t o0 = (B0 + h / 2) * 16 + 8 * (h % 2), n = std::min<int64_t>(8, p.out - o0);
    for (int r = 0; r < R; ++r) {
      if (n == 8) {
        _mm256_storeu_ps(p.y + (r0 + r) * p.out + o0, acc[r][h]);
      } else if (n > 0) {
        alignas(32) float part[8];
        _mm256_store_ps(part, acc[r][h]);
        std::memcpy(p.y + (r0 + r) * p.out + o0, part, static_cast<size_t>(n) * sizeof(float));
      }
    }
  }
}

enum class Kernel { kNone, kAvx2, kAvx512Bw, kAvx512Vnni };

// Output blocks [B0, B1) for every row, on the calling thread. One row (decoding): 4 blocks per tile, four
// streams of codes under one broadcast activation; more rows: tiles of 4 rows x 2 blocks (AVX2: 2 rows x 1 block,
// its 16 registers), the last rows in a smaller tile. The tile shape changes no result.
template <Kernel K>
void run_blocks(const Int4Args& p, int64_t rows, int64_t B0, int64_t B1) {
  auto tile = [&](auto r_count, auto v_count, int64_t r0, int64_t B) {
    constexpr int R = decltype(r_count)::value, V = decltype(v_count)::value;
    if constexpr (K == Kernel::kAvx512Vnni) tile_vnni<R, V>(p, r0, B);
    else if constexpr (K == Kernel::kAvx512Bw) tile_bw<R, V>(p, r0, B);
    else tile_avx2<R, V>(p, r0, B);
  };
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  using Three = std::integral_constant<int, 3>;
  using Four = std::integral_constant<int, 4>;
  constexpr bool wide = K != Kernel::kAvx2;
  if (rows == 1) {
    int64_t B = B0;
    if constexpr (wide)
      for (; B + 4 <= B1; B += 4) tile(One{}, Four{}, 0, B);
    for (; B + 2 <= B1; B += 2) tile(One{}, Two{}, 0, B);
    for (; B < B1; ++B) tile(One{}, One{}, 0, B);
    return;
  }
  constexpr int kRows = wide ? 4 : 2;
  for (int64_t B = B0; B < B1; B += wide ? 2 : 1) {
    const bool pair = wide && B + 2 <= B1;
    for (int64_t r = 0; r < rows; r += kRows) {
      const int64_t n = std::min<int64_t>(kRows, rows - r);
      if (pair) {
        if (n == 4) tile(Four{}, Two{}, r, B);
        else if (n == 3) tile(Three{}, Two{}, r, B);
        else if (n == 2) tile(Two{}, Two{}, r, B);
        else tile(One{}, Two{}, r, B);
      } else {
        if constexpr (wide) {
          if (n == 4) tile(Four{}, One{}, r, B);
          else if (n == 3) tile(Three{}, One{}, r, B);
        }
        if (n == 2) tile(Two{}, One{}, r, B);
        else if (n == 1) tile(One{}, One{}, r, B);
      }
    }
  }
}

bool cpu_has(const char* feature) {
  __builtin_cpu_init();
  if (std::string(feature) == "avx512bw") return __builtin_cpu_supports("avx512bw");
  return __builtin_cpu_supports("avx512vnni");
}

Kernel choose(const char* isa) {
  static const bool bw = cpu_has("avx512bw"), vnni = bw && cpu_has("avx512vnni");
  const std::string best = gemv_isa();  // after DSOPEN_GEMV_ISA
  const bool wide = best == "avx512" && bw;
  if (!isa) return wide ? (vnni ? Kernel::kAvx512Vnni : Kernel::kAvx512Bw) : best == "avx2" ? Kernel::kAvx2 : Kernel::kNone;
  const std::string want = isa;
  TORCH_CHECK(want == "avx512" || want == "avx512bw" || want == "avx2", "gemv_int4: unknown instruction set ", want);
  if (want == "avx2") {
    TORCH_CHECK(best != "portable", "gemv_int4: this CPU cannot run avx2");
    return Kernel::kAvx2;
  }
  TORCH_CHECK(wide, "gemv_int4: this CPU cannot run ", want);
  return want == "avx512" && vnni ? Kernel::kAvx512Vnni : Kernel::kAvx512Bw;
}

}  // namespace

const char* gemv_int4_isa(const char* isa) {
  switch (choose(isa)) {
    case Kernel::kNone: return nullptr;
    case Kernel::kAvx2: return "avx2";
    default: return "avx512";
  }
}

bool gemv_int4_supported() { return gemv_int4_isa(nullptr) != nullptr; }

const char* gemv_int4_rows(const float* x, int64_t rows, const Int4Pack& w, float* y, const char* isa) {
  const Kernel k = choose(isa);
  TORCH_CHECK(k != Kernel::kNone, "gemv_int4_rows: needs AVX2 + FMA");
  TORCH_CHECK(w.codes.defined() && w.in % 32 == 0 && w.group % 32 == 0 && w.in % w.group == 0,
              "gemv_int4_rows: the weight is not packed (pack_int4)");
  if (rows <= 0) return k == Kernel::kAvx2 ? "avx2" : k == Kernel::kAvx512Vnni ? "avx512-vnni" : "avx512-bw";
  thread_local Int4Activations a;
  quantize_rows(x, rows, w.in, w.group, a);
  const Int4Args p{w.codes.data_ptr<uint8_t>(), w.scales.data_ptr<float>(), w.scaled_zeros.data_ptr<float>(),
                   w.in, w.out, w.group, &a, y};
  const int64_t blocks = (w.out + 15) / 16;
  // ~64 KiB of codes per task at least (a block of 16 outputs holds 8 * in bytes).
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (8 * w.in));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    if (k == Kernel::kAvx512Vnni) run_blocks<Kernel::kAvx512Vnni>(p, rows, b0, b1);
    else if (k == Kernel::kAvx512Bw) run_blocks<Kernel::kAvx512Bw>(p, rows, b0, b1);
    else run_blocks<Kernel::kAvx2>(p, rows, b0, b1);
  });
  return k == Kernel::kAvx2 ? "avx2" : k == Kernel::kAvx512Vnni ? "avx512-vnni" : "avx512-bw";
}

}  // namespace dsopen::model
