// Fused ops: RMSNorm, SwiGLU, rotary embedding, and the LM head with its cross-entropy. Each is one pass over
// memory with a hand-written backward (a torch::autograd::Function) in place of a chain of ATen ops that each read
// and write the whole tensor and keep their intermediates alive until the backward. Values equal the unfused
// compositions of model/layers.h (RMSNorm, apply_rope*, MLP) up to float32 rounding; tests/test_fused_ops.cpp
// checks values and gradients in float32 and bfloat16 against them.
//
// Kernels: model/fused_cpu.h on the CPU, model/fused_cuda.h on CUDA devices when LibTorch has CUDA. Elsewhere
// the elementwise ops keep their unfused compositions; linear_cross_entropy runs its softmax on ATen ops off the
// CPU (its GEMMs are LibTorch's everywhere).
#pragma once

#include <torch/torch.h>

namespace dsopen::model::fused {

// Process-wide switch, on unless the environment sets DSOPEN_FUSED_OPS=0; the trainer sets it from
// train.fused_ops (false: every op through its unfused composition, for debugging).
bool enabled();
void set_enabled(bool on);
// Sets the switch for a scope (tests compare both paths in one process).
class Scope {
public:
  explicit Scope(bool on);
  ~Scope();
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

private:
  bool previous_;
};

// Whether the fused kernels take a tensor: enabled, on the CPU (or CUDA with the kernels compiled), float32 or
// bfloat16.
bool applies(const torch::Tensor& x);

// RMSNorm: x [..., D], weight [D] -> weight * (x / sqrt(mean(x^2) + eps)) with the statistics in float32 and the
// normalised x rounded to x's dtype before the weight multiplies it (as HF Llama/DeepSeek do); result dtype is
// the promotion of x's and weight's.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);

// SwiGLU's gating: silu(gate) * up, gate and up [..., I] of one dtype (a column slice of a wider tensor is read in
// place) -> [..., I] in that dtype, computed in float32.
torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up);

// Rotary embedding of the first rope_dim dimensions of x [B, T, H, D] (the rest passes through): cos/sin float32
// [T, rope_dim/2] or [B, T, rope_dim/2]; interleaved pairs (2i, 2i+1) or rotate-half pairs (i, i + rope_dim/2).
// Result in x's dtype, computed in float32. Whether it applies: rope_applies.
torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, bool interleaved,
                   int64_t rope_dim);
bool rope_applies(const torch::Tensor& x, const torch::Tensor& cos, int64_t rope_dim);

// The LM head and its loss without the [N, V] logits: hidden [N, H] (the final norm's output), weight [V, H],
// targets [N] int64 (-100: no target). Rows are processed in chunks of at most ~32 MB of float32 logits:
//   ce = sum over rows with a target of logsumexp(l) - l[target],   z = sum over the same rows of logsumexp(l)^2
// (z-loss, PaLM §5; computed when `z_loss`), l = hidden weight^T in the autocast dtype when autocast is on (else
// hidden's dtype), softmax statistics in float32. With autograd recording, the gradients of ce (and z) with respect
// to hidden and weight are formed chunk by chunk during the forward (Liger-Kernel's approach: no recomputed GEMM)
// and scaled by the incoming gradients in the backward.
struct CrossEntropySums {
  torch::Tensor ce;  // float32 scalar
  torch::Tensor z;   // float32 scalar (undefined without z_loss)
};
CrossEntropySums linear_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& weight,
                                      const torch::Tensor& targets, bool z_loss);

}  // namespace dsopen::model::fused
