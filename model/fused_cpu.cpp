#include "model/fused_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace dsopen::model::kernels {

// The row loops below are plain C++ that GCC vectorizes (this file is compiled with -fno-trapping-math, without which
// GCC leaves every loop with a float comparison - exp's clamp, sigmoid - scalar); target_clones compiles each for AVX-512, AVX2 and the
// baseline and picks one when the library loads. Reductions keep 16 independent partial sums so that they
// vectorize without -ffast-math (float addition is not associative, so the compiler may not reorder one sum).
#define DSOPEN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define DSOPEN_INLINE inline __attribute__((always_inline))

namespace detail {

DSOPEN_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
DSOPEN_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
// bfloat16 rounding as c10::BFloat16 does it: to nearest, ties to even; NaN -> quiet NaN.
DSOPEN_INLINE uint32_t round_bf16_bits(float f) {
  const uint32_t u = float_to_bits(f);
  return (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc00000u : (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
}

// e^x to ~2 ulp (Cephes expf: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial, 2^n by the exponent
// bits); inputs are clamped to [-87.3, 88.3], where float32 e^x is finite and normal.
DSOPEN_INLINE float exp_approx(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

DSOPEN_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

DSOPEN_CLONES void bf16_to_f32(const uint16_t* s, float* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = bits_to_float(static_cast<uint32_t>(s[i]) << 16);
}

DSOPEN_CLONES void f32_to_bf16(const float* s, uint16_t* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint16_t>(round_bf16_bits(s[i]) >> 16);
}

DSOPEN_CLONES float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) acc[k] += a[i + k] * b[i + k];
  float s = 0;
  for (int k = 0; k < 16; ++k) s += acc[k];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

DSOPEN_CLONES float dot3(const float* a, const float* b, const float* c, int64_t n) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) acc[k] += a[i + k] * b[i + k] * c[i + k];
  float s = 0;
  for (int k = 0; k < 16; ++k) s += acc[k];
  for (; i < n; ++i) s += a[i] * b[i] * c[i];
  return s;
}

// y = w * h, h = x * r (rounded to bf16 when round_h)
DSOPEN_CLONES void rms_apply(const float* x, const float* w, float r, bool round_h, float* y, int64_t n) {
  if (round_h) {
    for (int64_t i = 0; i < n; ++i) y[i] = w[i] * bits_to_float(round_bf16_bits(x[i] * r));
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
  }
}

// dx = r * (dy * w - x * r * c); dw += dy * h (dx or dw null: not wanted)
DSOPEN_CLONES void rms_backward_row(const float* x, const float* dy, const float* w, float r, float c, bool round_h,
                                    float* dx, float* dw, int64_t n) {
  if (dx)
    for (int64_t i = 0; i < n; ++i) dx[i] = r * (dy[i] * w[i] - x[i] * r * c);
  if (dw && round_h)
    for (int64_t i = 0; i < n; ++i) dw[i] += dy[i] * bits_to_float(round_bf16_bits(x[i] * r));
  else if (dw)
    for (int64_t i = 0; i < n; ++i) dw[i] += dy[i] * (x[i] * r);
}

DSOPEN_CLONES void swiglu_row(const float* g, const float* u, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = g[i] * sigmoid(g[i]) * u[i];
}

DSOPEN_CLONES void swiglu_backward_row(const float* dy, const float* g, const float* u, float* dg, float* du,
                                       int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float s = sigmoid(g[i]);
    dg[i] = dy[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
    du[i] = dy[i] * g[i] * s;
  }
}

// (a, b) -> (a c - b s, b c + a s) with s multiplied by `sign` (-1: the inverse rotation)
DSOPEN_CLONES void rope_half_row(const float* x, float* y, const float* c, const float* s, int64_t half, float sign) {
  for (int64_t j = 0; j < half; ++j) {
    const float a = x[j], b = x[j + half], sj = s[j] * sign;
    y[j] = a * c[j] - b * sj;
    y[j + half] = b * c[j] + a * sj;
  }
}

DSOPEN_CLONES void rope_interleaved_row(const float* x, float* y, const float* c, const float* s, int64_t half,
                                        float sign) {
  for (int64_t j = 0; j < half; ++j) {
    const float a = x[2 * j], b = x[2 * j + 1], sj = s[j] * sign;
    y[2 * j] = a * c[j] - b * sj;
    y[2 * j + 1] = b * c[j] + a * sj;
  }
}

DSOPEN_CLONES float row_max(const float* x, int64_t n) {
  float acc[16];
  for (int k = 0; k < 16; ++k) acc[k] = -INFINITY;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) acc[k] = std::max(acc[k], x[i + k]);
  float m = -INFINITY;
  for (int k = 0; k < 16; ++k) m = std::max(m, acc[k]);
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// x <- exp(x - m); returns the sum
DSOPEN_CLONES float exp_shift_sum(float* x, float m, int64_t n) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) {
      x[i + k] = exp_approx(x[i + k] - m);
      acc[k] += x[i + k];
    }
  float s = 0;
  for (int k = 0; k < 16; ++k) s += acc[k];
  for (; i < n; ++i) {
    x[i] = exp_approx(x[i] - m);
    s += x[i];
  }
  return s;
}

DSOPEN_CLONES void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// p = e * inv; x <- p; z (when not null) <- zscale * p
DSOPEN_CLONES void scale_row(float* x, float inv, float* z, float zscale, int64_t n) {
  if (z)
    for (int64_t i = 0; i < n; ++i) {
      x[i] *= inv;
      z[i] = zscale * x[i];
    }
  else
    for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

}  // namespace detail

namespace {

// Row `offset` of `base` as float32: the buffer itself when it is float32, else converted into `buf`.
const float* load_row(const void* base, DType t, int64_t offset, float* buf, int64_t n) {
  if (t == DType::kF32) return static_cast<const float*>(base) + offset;
  detail::bf16_to_f32(static_cast<const uint16_t*>(base) + offset, buf, n);
  return buf;
}
// Where to compute an output row: in place when float32, else in `buf` (then store_row converts).
float* out_row(void* base, DType t, int64_t offset, float* buf) {
  return t == DType::kF32 ? static_cast<float*>(base) + offset : buf;
}
void store_row(const float* src, void* base, DType t, int64_t offset, int64_t n) {
  if (t == DType::kF32) {
    float* dst = static_cast<float*>(base) + offset;
    if (dst != src) std::memcpy(dst, src, static_cast<size_t>(n) * 4);
  } else {
    detail::f32_to_bf16(src, static_cast<uint16_t*>(base) + offset, n);
  }
}

// Rows per task: enough elements that scheduling costs nothing next to the work.
int64_t grain(int64_t row_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_elems, 1)); }

std::vector<float> to_float(const void* w, DType t, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  if (t == DType::kF32) std::memcpy(out.data(), w, static_cast<size_t>(n) * 4);
  else detail::bf16_to_f32(static_cast<const uint16_t*>(w), out.data(), n);
  return out;
}

}  // namespace

void rmsnorm_forward(const void* x, DType xt, int64_t ldx, const void* w, DType wt, void* y, DType yt, float* rstd,
                     int64_t N, int64_t D, float eps, bool round_h) {
  const std::vector<float> wf = to_float(w, wt, D);
  at::parallel_for(0, N, grain(D), [&](int64_t begin, int64_t end) {
    std::vector<float> bx(static_cast<size_t>(D)), by(static_cast<size_t>(D));
    for (int64_t n = begin; n < end; ++n) {
      const float* xr = load_row(x, xt, n * ldx, bx.data(), D);
      const float r = 1.0f / std::sqrt(detail::dot(xr, xr, D) / static_cast<float>(D) + eps);
      float* yr = out_row(y, yt, n * D, by.data());
      detail::rms_apply(xr, wf.data(), r, round_h, yr, D);
      store_row(yr, y, yt, n * D, D);
      rstd[n] = r;
    }
  });
}

void rmsnorm_backward(const void* dy, DType yt, const void* x, DType xt, int64_t ldx, const void* w, DType wt,
                      const float* rstd, void* dx, float* dw, int64_t N, int64_t D, bool round_h) {
  const std::vector<float> wf = to_float(w, wt, D);
  // dw: one partial sum per thread, added up at the end (no atomics, a fixed order per thread count).
  const int threads = at::get_num_threads();
  std::vector<std::vector<float>> partial(dw ? static_cast<size_t>(threads) : 0);
  at::parallel_for(0, N, grain(D), [&](int64_t begin, int64_t end) {
    std::vector<float> bx(static_cast<size_t>(D)), bdy(static_cast<size_t>(D)), bdx(static_cast<size_t>(D));
    float* acc = nullptr;
    if (dw) {
      auto& p = partial[static_cast<size_t>(at::get_thread_num())];
      if (p.empty()) p.assign(static_cast<size_t>(D), 0.0f);
      acc = p.data();
    }
    for (int64_t n = begin; n < end; ++n) {
      const float* xr = load_row(x, xt, n * ldx, bx.data(), D);
      const float* dyr = load_row(dy, yt, n * D, bdy.data(), D);
      const float r = rstd[n];
      const float c = r * detail::dot3(dyr, wf.data(), xr, D) / static_cast<float>(D);  // mean(g * xhat)
      float* dxr = dx ? out_row(dx, xt, n * D, bdx.data()) : nullptr;
      detail::rms_backward_row(xr, dyr, wf.data(), r, c, round_h, dxr, acc, D);
      if (dx) store_row(dxr, dx, xt, n * D, D);
    }
  });
  if (!dw) return;
  std::fill(dw, dw + D, 0.0f);
  for (const auto& p : partial)
    for (int64_t d = 0; d < static_cast<int64_t>(p.size()); ++d) dw[d] += p[static_cast<size_t>(d)];
}

void swiglu_forward(const void* g, int64_t ldg, const void* u, int64_t ldu, DType t, void* y, int64_t N, int64_t I) {
  at::parallel_for(0, N, grain(I), [&](int64_t begin, int64_t end) {
    std::vector<float> bg(static_cast<size_t>(I)), bu(static_cast<size_t>(I)), by(static_cast<size_t>(I));
    for (int64_t n = begin; n < end; ++n) {
      const float* gr = load_row(g, t, n * ldg, bg.data(), I);
      const float* ur = load_row(u, t, n * ldu, bu.data(), I);
      float* yr = out_row(y, t, n * I, by.data());
      detail::swiglu_row(gr, ur, yr, I);
      store_row(yr, y, t, n * I, I);
    }
  });
}

void swiglu_backward(const void* dy, const void* g, int64_t ldg, const void* u, int64_t ldu, DType t, void* dg,
                     void* du, int64_t N, int64_t I) {
  at::parallel_for(0, N, grain(I), [&](int64_t begin, int64_t end) {
    const size_t n_ = static_cast<size_t>(I);
    std::vector<float> bdy(n_), bg(n_), bu(n_), bdg(n_), bdu(n_);
    for (int64_t n = begin; n < end; ++n) {
      const float* dyr = load_row(dy, t, n * I, bdy.data(), I);
      const float* gr = load_row(g, t, n * ldg, bg.data(), I);
      const float* ur = load_row(u, t, n * ldu, bu.data(), I);
      float* dgr = out_row(dg, t, n * I, bdg.data());
      float* dur = out_row(du, t, n * I, bdu.data());
      detail::swiglu_backward_row(dyr, gr, ur, dgr, dur, I);
      store_row(dgr, dg, t, n * I, I);
      store_row(dur, du, t, n * I, I);
    }
  });
}

void rope(const void* x, void* y, DType t, int64_t R, int64_t H, int64_t D, const float* cos, const float* sin,
          int64_t C, int64_t rope_dim, bool interleaved, bool inverse) {
  const int64_t half = rope_dim / 2;
  const float sign = inverse ? -1.0f : 1.0f;
  at::parallel_for(0, R * H, grain(D), [&](int64_t begin, int64_t end) {
    std::vector<float> bx(static_cast<size_t>(D)), by(static_cast<size_t>(D));
    for (int64_t i = begin; i < end; ++i) {  // i = position * H + head
      const float* c = cos + ((i / H) % C) * half;
      const float* s = sin + ((i / H) % C) * half;
      const float* xr = load_row(x, t, i * D, bx.data(), D);
      float* yr = out_row(y, t, i * D, by.data());
      if (interleaved) detail::rope_interleaved_row(xr, yr, c, s, half, sign);
      else detail::rope_half_row(xr, yr, c, s, half, sign);
      if (rope_dim < D) std::memcpy(yr + rope_dim, xr + rope_dim, static_cast<size_t>(D - rope_dim) * 4);
      store_row(yr, y, t, i * D, D);
    }
  });
}

void softmax_cross_entropy(float* logits, const int64_t* targets, float* lse, float* ce, int64_t N, int64_t V,
                           bool grad, float* grad_z) {
  at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      float* l = logits + n * V;
      float* z = grad_z ? grad_z + n * V : nullptr;
      const int64_t target = targets[n];
      if (target < 0) {  // no target: nothing to learn from this row
        lse[n] = 0.0f;
        ce[n] = 0.0f;
        if (grad) std::memset(l, 0, static_cast<size_t>(V) * 4);
        if (z) std::memset(z, 0, static_cast<size_t>(V) * 4);
        continue;
      }
      const float m = detail::row_max(l, V);
      const float target_logit = l[target];
      const float sum = detail::exp_shift_sum(l, m, V);  // l <- exp(l - m)
      lse[n] = m + std::log(sum);
      ce[n] = lse[n] - target_logit;
      if (!grad) continue;
      detail::scale_row(l, 1.0f / sum, z, 2.0f * lse[n], V);  // l <- p, z <- 2 lse p
      l[target] -= 1.0f;
    }
  });
}

}  // namespace dsopen::model::kernels
