// CUDA kernels of model/fused_cuda.h (formulas: model/fused_cpu.h). Arithmetic in float32; bfloat16 values are
// converted on load and rounded to nearest-even on store, as on the CPU.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "model/fused_cuda.h"

namespace dsopen::model::kernels::cuda {

namespace {

using bf16 = __nv_bfloat16;
constexpr int kThreads = 256;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(bf16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ bf16 from_f<bf16>(float v) { return __float2bfloat16_rn(v); }
__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + __expf(-v)); }

// Sum of v over the block (every thread gets it). Warp shuffles, then the per-warp sums in shared memory.
__device__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  __shared__ float total;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (blockDim.x + 31) / 32 ? warp_sums[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) total = v;
  }
  __syncthreads();
  const float out = total;
  __syncthreads();  // warp_sums and total may be reused by the next call
  return out;
}

int64_t grid_for(int64_t work) { return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, 1 << 16)); }

// ---- RMSNorm ---------------------------------------------------------------------------------------------------

template <typename X, typename W, typename Y>
__global__ void rmsnorm_forward_kernel(const X* x, int64_t ldx, const W* w, Y* y, float* rstd, int64_t D, float eps,
                                       bool round_h) {
  const int64_t n = blockIdx.x;
  const X* xr = x + n * ldx;
  float ss = 0.0f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const float v = to_f(xr[d]);
    ss += v * v;
  }
  const float r = rsqrtf(block_sum(ss) / static_cast<float>(D) + eps);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float h = to_f(xr[d]) * r;
    if (round_h) h = round_bf16(h);
    y[n * D + d] = from_f<Y>(to_f(w[d]) * h);
  }
  if (threadIdx.x == 0) rstd[n] = r;
}

template <typename X, typename W, typename Y>
__global__ void rmsnorm_dx_kernel(const Y* dy, const X* x, int64_t ldx, const W* w, const float* rstd, X* dx,
                                  int64_t D) {
  const int64_t n = blockIdx.x;
  const X* xr = x + n * ldx;
  const Y* dyr = dy + n * D;
  const float r = rstd[n];
  float s = 0.0f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) s += to_f(dyr[d]) * to_f(w[d]) * to_f(xr[d]);
  const float c = r * block_sum(s) / static_cast<float>(D);  // mean(g * xhat)
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
    dx[n * D + d] = from_f<X>(r * (to_f(dyr[d]) * to_f(w[d]) - to_f(xr[d]) * r * c));
}

// dw: blocks of 32 columns x 8 row groups; blockIdx.y splits the rows further, each split writing its own partial
// row, summed by rmsnorm_dw_sum_kernel (a fixed order: deterministic).
template <typename X, typename Y>
__global__ void rmsnorm_dw_kernel(const Y* dy, const X* x, int64_t ldx, const float* rstd, float* partial, int64_t N,
                                  int64_t D, bool round_h) {
  __shared__ float part[8][33];
  const int64_t col = blockIdx.x * 32 + threadIdx.x;
  float acc = 0.0f;
  if (col < D)
    for (int64_t n = blockIdx.y * 8 + threadIdx.y; n < N; n += 8 * gridDim.y) {
      float h = to_f(x[n * ldx + col]) * rstd[n];
      if (round_h) h = round_bf16(h);
      acc += to_f(dy[n * D + col]) * h;
    }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < D) {
    float s = 0.0f;
    for (int k = 0; k < 8; ++k) s += part[k][threadIdx.x];
    partial[blockIdx.y * D + col] = s;
  }
}

__global__ void rmsnorm_dw_sum_kernel(const float* partial, float* dw, int64_t splits, int64_t D) {
  for (int64_t col = blockIdx.x * blockDim.x + threadIdx.x; col < D; col += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int64_t k = 0; k < splits; ++k) s += partial[k * D + col];
    dw[col] = s;
  }
}

// ---- SwiGLU ----------------------------------------------------------------------------------------------------

template <typename T>
__global__ void swiglu_forward_kernel(const T* g, int64_t ldg, const T* u, int64_t ldu, T* y, int64_t N, int64_t I) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < N * I;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / I, j = i % I;
    const float gv = to_f(g[n * ldg + j]);
    y[i] = from_f<T>(gv * sigmoid(gv) * to_f(u[n * ldu + j]));
  }
}

template <typename T>
__global__ void swiglu_backward_kernel(const T* dy, const T* g, int64_t ldg, const T* u, int64_t ldu, T* dg, T* du,
                                       int64_t N, int64_t I) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < N * I;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / I, j = i % I;
    const float gv = to_f(g[n * ldg + j]), uv = to_f(u[n * ldu + j]), d = to_f(dy[i]), s = sigmoid(gv);
    dg[i] = from_f<T>(d * uv * s * (1.0f + gv * (1.0f - s)));
    du[i] = from_f<T>(d * gv * s);
  }
}

// ---- Rotary embedding ------------------------------------------------------------------------------------------

// One output element per thread: its pair partner is read too.
template <typename T>
__global__ void rope_kernel(const T* x, T* y, int64_t RH, int64_t H, int64_t D, const float* cos, const float* sin,
                            int64_t C, int64_t rope_dim, bool interleaved, float sign) {
  const int64_t half = rope_dim / 2;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < RH * D;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / D, j = i % D;
    const T* xr = x + row * D;
    if (j >= rope_dim) {
      y[i] = xr[j];
      continue;
    }
    const int64_t pos = (row / H) % C;
    int64_t p;  // pair index
    float out;
    if (interleaved) {
      p = j / 2;
      const float c = cos[pos * half + p], s = sin[pos * half + p] * sign;
      out = (j % 2 == 0) ? to_f(xr[j]) * c - to_f(xr[j + 1]) * s : to_f(xr[j]) * c + to_f(xr[j - 1]) * s;
    } else {
      p = j < half ? j : j - half;
      const float c = cos[pos * half + p], s = sin[pos * half + p] * sign;
      out = j < half ? to_f(xr[j]) * c - to_f(xr[j + half]) * s : to_f(xr[j]) * c + to_f(xr[j - half]) * s;
    }
    y[i] = from_f<T>(out);
  }
}

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// Calls f with a typed null pointer of the element type of `t` (float or bf16).
template <typename F>
void with_type(DType t, F&& f) {
  if (t == DType::kF32) f(static_cast<float*>(nullptr));
  else f(static_cast<bf16*>(nullptr));
}
// The same for three dtypes: f(x*, w*, y*).
template <typename F>
void with_types(DType a, DType b, DType c, F&& f) {
  with_type(a, [&](auto* pa) { with_type(b, [&](auto* pb) { with_type(c, [&](auto* pc) { f(pa, pb, pc); }); }); });
}

}  // namespace

int64_t rmsnorm_dw_splits(int64_t N) { return std::max<int64_t>(1, std::min<int64_t>(64, N / 256)); }

void rmsnorm_forward(const void* x, DType xt, int64_t ldx, const void* w, DType wt, void* y, DType yt, float* rstd,
                     int64_t N, int64_t D, float eps, bool round_h, void* stream) {
  with_types(xt, wt, yt, [&](auto* xp, auto* wp, auto* yp) {
    using X = std::remove_pointer_t<decltype(xp)>;
    using W = std::remove_pointer_t<decltype(wp)>;
    using Y = std::remove_pointer_t<decltype(yp)>;
    rmsnorm_forward_kernel<X, W, Y><<<static_cast<unsigned>(N), kThreads, 0, as_stream(stream)>>>(
        static_cast<const X*>(x), ldx, static_cast<const W*>(w), static_cast<Y*>(y), rstd, D, eps, round_h);
  });
}

void rmsnorm_backward(const void* dy, DType yt, const void* x, DType xt, int64_t ldx, const void* w, DType wt,
                      const float* rstd, void* dx, float* dw, float* dw_partial, int64_t N, int64_t D, bool round_h,
                      void* stream) {
  with_types(xt, wt, yt, [&](auto* xp, auto* wp, auto* yp) {
    using X = std::remove_pointer_t<decltype(xp)>;
    using W = std::remove_pointer_t<decltype(wp)>;
    using Y = std::remove_pointer_t<decltype(yp)>;
    if (dx)
      rmsnorm_dx_kernel<X, W, Y><<<static_cast<unsigned>(N), kThreads, 0, as_stream(stream)>>>(
          static_cast<const Y*>(dy), static_cast<const X*>(x), ldx, static_cast<const W*>(w), rstd,
          static_cast<X*>(dx), D);
    if (dw) {
      const int64_t splits = rmsnorm_dw_splits(N);
      dim3 grid(static_cast<unsigned>((D + 31) / 32), static_cast<unsigned>(splits)), block(32, 8);
      rmsnorm_dw_kernel<X, Y><<<grid, block, 0, as_stream(stream)>>>(
          static_cast<const Y*>(dy), static_cast<const X*>(x), ldx, rstd, dw_partial, N, D, round_h);
      rmsnorm_dw_sum_kernel<<<static_cast<unsigned>(grid_for(D)), kThreads, 0, as_stream(stream)>>>(
          dw_partial, dw, splits, D);
    }
  });
}

void swiglu_forward(const void* g, int64_t ldg, const void* u, int64_t ldu, DType t, void* y, int64_t N, int64_t I,
                    void* stream) {
  with_type(t, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    swiglu_forward_kernel<T><<<static_cast<unsigned>(grid_for(N * I)), kThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(g), ldg, static_cast<const T*>(u), ldu, static_cast<T*>(y), N, I);
  });
}

void swiglu_backward(const void* dy, const void* g, int64_t ldg, const void* u, int64_t ldu, DType t, void* dg,
                     void* du, int64_t N, int64_t I, void* stream) {
  with_type(t, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    swiglu_backward_kernel<T><<<static_cast<unsigned>(grid_for(N * I)), kThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(dy), static_cast<const T*>(g), ldg, static_cast<const T*>(u), ldu, static_cast<T*>(dg),
        static_cast<T*>(du), N, I);
  });
}

void rope(const void* x, void* y, DType t, int64_t R, int64_t H, int64_t D, const float* cos, const float* sin,
          int64_t C, int64_t rope_dim, bool interleaved, bool inverse, void* stream) {
  with_type(t, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    rope_kernel<T><<<static_cast<unsigned>(grid_for(R * H * D)), kThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(x), static_cast<T*>(y), R * H, H, D, cos, sin, C, rope_dim, interleaved,
        inverse ? -1.0f : 1.0f);
  });
}

const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : cudaGetErrorString(e);
}

}  // namespace dsopen::model::kernels::cuda
