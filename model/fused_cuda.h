// CUDA kernels behind model/fused_ops.h: the same ops, shapes and formulas as model/fused_cpu.h, on device
// buffers, launched on `stream` (a cudaStream_t). Compiled when LibTorch has CUDA (DSOPEN_WITH_CUDA); this header
// and model/fused_cuda.cu use no LibTorch types, so nvcc compiles them without LibTorch's headers.
//
// Launch shapes (llm.c style):
//   rmsnorm_forward   one block of 256 threads per row: a strided pass for sum(x^2) (warp shuffles, then one
//                     shared-memory step across warps), then a strided pass writing y
//   rmsnorm_backward  dx: one block per row (one reduction: sum(dy * w * x)); dw: blocks of 32 columns x 8 row
//                     groups, each thread summing every 8th row of its column, a shared-memory sum of the 8 groups
//                     (deterministic, no atomics)
//   swiglu_*          one thread per element, grid-stride
//   rope              one thread per rotated pair or passed-through element, grid-stride
#pragma once

#include <cstdint>

#include "model/fused_cpu.h"

namespace dsopen::model::kernels::cuda {

void rmsnorm_forward(const void* x, DType xt, int64_t ldx, const void* w, DType wt, void* y, DType yt, float* rstd,
                     int64_t N, int64_t D, float eps, bool round_h, void* stream);
// dw_partial: float32 [rmsnorm_dw_splits(N), D] scratch (when dw is wanted).
void rmsnorm_backward(const void* dy, DType yt, const void* x, DType xt, int64_t ldx, const void* w, DType wt,
                      const float* rstd, void* dx, float* dw, float* dw_partial, int64_t N, int64_t D, bool round_h,
                      void* stream);
int64_t rmsnorm_dw_splits(int64_t N);
void swiglu_forward(const void* g, int64_t ldg, const void* u, int64_t ldu, DType t, void* y, int64_t N, int64_t I,
                    void* stream);
void swiglu_backward(const void* dy, const void* g, int64_t ldg, const void* u, int64_t ldu, DType t, void* dg,
                     void* du, int64_t N, int64_t I, void* stream);
void rope(const void* x, void* y, DType t, int64_t R, int64_t H, int64_t D, const float* cos, const float* sin,
          int64_t C, int64_t rope_dim, bool interleaved, bool inverse, void* stream);

// The last launch error as text ("" when none): the caller turns it into an exception.
const char* last_error();

}  // namespace dsopen::model::kernels::cuda
