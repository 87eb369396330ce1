// CPU kernels behind model/fused_ops.h, on raw row-major buffers (float32 or bfloat16 bits). Every kernel reads
// its inputs once and writes its outputs once, threads over rows (at::parallel_for) and does its arithmetic in
// float32; the loops are compiled for AVX-512, AVX2 and the baseline, chosen at load time from the CPU.
//
// Shapes: N rows (tokens, or tokens x heads), D / I columns. A row stride `ld` (elements) lets an input be a
// column slice of a wider matrix (the compressed half of MLA's kv_a projection, GLM's fused gate_up halves).
#pragma once

#include <cstdint>

namespace dsopen::model::kernels {

enum class DType { kF32, kBF16 };

// ---- RMSNorm (Zhang & Sennrich 2019), as HF Llama/DeepSeek compute it -------------------------------------------
//   r_n  = 1 / sqrt(mean_d x[n,d]^2 + eps)                       (float32)
//   h    = x * r_n, rounded to x's dtype when `round_h` (x bf16) ; y = w * h in y's dtype
// forward: x [N, D] (stride ldx), w [D] -> y [N, D] contiguous, rstd [N] float32 (saved for the backward).
void rmsnorm_forward(const void* x, DType xt, int64_t ldx, const void* w, DType wt, void* y, DType yt, float* rstd,
                     int64_t N, int64_t D, float eps, bool round_h);
// backward, with g = dy * w:
//   dx[n,d] = r_n * (g[n,d] - xhat[n,d] * mean_k(g[n,k] * xhat[n,k])),   xhat = x * r_n
//   dw[d]   = sum_n dy[n,d] * h[n,d]                  (float32 [D]; null when w needs no gradient)
// dy [N, D] contiguous in yt, dx [N, D] contiguous in xt (null when x needs no gradient).
void rmsnorm_backward(const void* dy, DType yt, const void* x, DType xt, int64_t ldx, const void* w, DType wt,
                      const float* rstd, void* dx, float* dw, int64_t N, int64_t D, bool round_h);

// ---- SwiGLU (Shazeer 2020): y = silu(g) * u, silu(g) = g * sigmoid(g) ------------------------------------------
// g, u [N, I] (row strides ldg, ldu), y [N, I] contiguous, all in `t`.
void swiglu_forward(const void* g, int64_t ldg, const void* u, int64_t ldu, DType t, void* y, int64_t N, int64_t I);
// dg = dy * u * s * (1 + g * (1 - s)), du = dy * g * s, s = sigmoid(g); dg, du [N, I] contiguous in `t`.
void swiglu_backward(const void* dy, const void* g, int64_t ldg, const void* u, int64_t ldu, DType t, void* dg,
                     void* du, int64_t N, int64_t I);

// ---- Rotary position embedding (Su et al. 2021, RoFormer) ------------------------------------------------------
// x [R, H, D] contiguous (R = B*T positions, H heads), cos/sin float32 [C, rope_dim/2] with row r using cos row
// r % C (C = T: shared by the batch; C = R: per sequence). The first rope_dim dimensions rotate, the rest copy.
//   rotate-half (HF Llama/Qwen): pair (j, j + rope_dim/2);  interleaved (DeepSeek checkpoints): pair (2j, 2j+1)
//   (a, b) -> (a c - b s, b c + a s); `inverse` rotates by -angle (the backward: the rotation is orthogonal).
// y [R, H, D] contiguous, same dtype.
void rope(const void* x, void* y, DType t, int64_t R, int64_t H, int64_t D, const float* cos, const float* sin,
          int64_t C, int64_t rope_dim, bool interleaved, bool inverse);

// ---- Softmax cross-entropy on a chunk of logits (float32, overwritten) -----------------------------------------
// logits [N, V] float32, targets [N] (-100: none). Per row with a target:
//   lse = logsumexp(logits), ce = lse - logits[target], p = softmax(logits)
// returns lse [N], ce [N] (0 for rows without target). With `grad`, the logits are replaced by
//   grad_ce = p - onehot(target)         and, when grad_z is not null, grad_z [N, V] = 2 * lse * p
// (the gradients of ce and of lse^2, z-loss); rows without a target become 0.
void softmax_cross_entropy(float* logits, const int64_t* targets, float* lse, float* ce, int64_t N, int64_t V,
                           bool grad, float* grad_z);

// ---- Row primitives (float32 rows of n elements), for callers that loop over rows themselves ------------------
// (model/decode_step.cpp). Compiled as the kernels above are.
namespace detail {
float dot(const float* a, const float* b, int64_t n);
void rms_apply(const float* x, const float* w, float r, bool round_h, float* y, int64_t n);  // y = w * (x * r)
void swiglu_row(const float* g, const float* u, float* y, int64_t n);                         // y = silu(g) * u
// (a, b) -> (a c - b s, b c + a s) over `half` pairs, s times `sign`; pairs (j, j + half) or (2j, 2j + 1).
void rope_half_row(const float* x, float* y, const float* c, const float* s, int64_t half, float sign);
void rope_interleaved_row(const float* x, float* y, const float* c, const float* s, int64_t half, float sign);
void bf16_to_f32(const uint16_t* s, float* d, int64_t n);
void f32_to_bf16(const float* s, uint16_t* d, int64_t n);
float row_max(const float* x, int64_t n);
float exp_shift_sum(float* x, float m, int64_t n);  // x <- exp(x - m); returns the sum
void axpy(float a, const float* x, float* y, int64_t n);  // y += a * x
}  // namespace detail

}  // namespace dsopen::model::kernels
