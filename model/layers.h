// Building blocks: RMSNorm, rotary position embeddings (plain and YaRN, rotate-half and interleaved layouts)
// and the SwiGLU MLP. Rope math is in free functions so tests can call it directly.
#pragma once

#include <torch/torch.h>

#include <memory>
#include <mutex>

#include "model/config.h"
#include "model/linear.h"

namespace dsopen::model {

// y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 and cast back (as HF Llama/DeepSeek do).
class RMSNormImpl : public torch::nn::Module {
public:
  RMSNormImpl(int64_t dim, double eps);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;

private:
  double eps_;
};
TORCH_MODULE(RMSNorm);

// ---- Rotary embeddings ----------------------------------------------------------------------------------------

// YaRN attention-temperature factor: 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1).
double yarn_get_mscale(double scale, double mscale);

// Inverse frequencies [dim/2] for rotary dimension `dim`: theta^(-2i/dim), then by scaling.type
//   linear  divided by factor
//   yarn    dimensions rotating fewer than beta_slow times over the original context are interpolated by 1/factor,
//           those rotating more than beta_fast times are kept, a linear ramp blends between (DeepSeek-V3
//           `precompute_freqs_cis`)
//   llama3  wavelengths beyond original/low_freq_factor divided by factor, below original/high_freq_factor kept,
//           a blend by (original / wavelength - low) / (high - low) between (transformers _compute_llama3_parameters)
//   dynamic the plain frequencies (they change only past max_position_embeddings; see RopeTable)
torch::Tensor rope_inv_freq(int64_t dim, double theta, const RopeScaling& scaling);

// Scale applied to cos/sin under YaRN: attention_factor when given, else (DeepSeek's reference)
// mscale(factor, mscale) / mscale(factor, mscale_all_dim), the denominator 1 when mscale_all_dim is absent;
// 1 without YaRN.
double rope_cos_sin_scale(const RopeScaling& scaling);

// Softmax scale of MLA attention: head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek-V2/V3;
// MHA/GQA models use head_dim^-0.5 alone).
double attention_softmax_scale(int64_t qk_head_dim, const RopeScaling& scaling);

// cos/sin rows for positions [0, max_positions), each row [dim/2] float32, computed as far as positions are used
// (growing by doubling): a model that allows a million positions does not hold a million rows until it sees them.
// Under dynamic NTK scaling a call reaching S > trained_positions positions gets rows computed for it alone with
// the base theta * (factor * S / trained_positions - (factor - 1))^(dim / (dim - 2)), as transformers does per
// forward pass; max_positions is then trained_positions * factor.
class RopeTable {
public:
  RopeTable() = default;
  RopeTable(int64_t dim, int64_t max_positions, double theta, const RopeScaling& scaling,
            int64_t trained_positions = 0);
  // Rows for positions [start, start + len) on `device`: [len, dim/2] each.
  std::pair<torch::Tensor, torch::Tensor> slice(int64_t start, int64_t len, const torch::Device& device) const;
  // Rows for explicit positions [B, T] -> [B, T, dim/2] each (packed documents restart at 0).
  std::pair<torch::Tensor, torch::Tensor> gather(const torch::Tensor& positions) const;
  // The whole tables, CPU float32 [rows, dim/2] each with rows >= positions, for callers that index them
  // directly; undefined when positions exceed max_position_embeddings or need rows of their own (dynamic NTK
  // past the trained length): such callers then go through slice/gather.
  std::pair<torch::Tensor, torch::Tensor> table(int64_t positions) const;

private:
  void ensure(int64_t positions) const;  // rows [0, positions) computed; called with mutex_ held
  // Dynamic NTK rows for `positions` (any shape) of a call that reaches `reach` positions: [..., dim/2] each.
  std::pair<torch::Tensor, torch::Tensor> dynamic_rows(const torch::Tensor& positions, int64_t reach) const;

  int64_t dim_ = 0, trained_positions_ = 0;
  double theta_ = 10000.0, dynamic_factor_ = 0.0;  // > 0: dynamic NTK scaling
  int64_t max_positions_ = 0;
  double scale_ = 1.0;
  torch::Tensor inv_freq_;               // [dim/2] float64
  mutable std::shared_ptr<std::mutex> mutex_ = std::make_shared<std::mutex>();
  mutable torch::Tensor cos_, sin_;      // [computed, dim/2] float32
};

// x: [B, T, H, dim]; cos/sin: [T, dim/2] or [B, T, dim/2].
// rotate-half layout (HF Llama/Qwen): pairs are (i, i + dim/2).
torch::Tensor apply_rope_half(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);
// interleaved layout (DeepSeek-V2/V3 checkpoints, MLA rope part): pairs are (2i, 2i + 1).
torch::Tensor apply_rope_interleaved(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);

// Rope on the first `rope_dim` dimensions of each head (partial rotary, GLM), the rest passed through.
// x: [B, T, H, head_dim]; layout as above.
torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                         RopeLayout layout, int64_t rope_dim);

// ---- SwiGLU MLP -----------------------------------------------------------------------------------------------

// silu(gate) * up (fused when model/fused_ops.h applies).
torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up);

// down(silu(gate(x)) * up(x)), no biases. kSeparate: gate and up are two projections, named `names` (HF
// gate_proj / up_proj / down_proj; Mixtral's experts w1 / w3 / w2). kFusedGateUp: one gate_up_proj [2I, hidden]
// whose first I rows are the gate (GLM).
class MLPImpl : public torch::nn::Module {
public:
  MLPImpl(int64_t hidden, int64_t intermediate, MLPKind kind = MLPKind::kSeparate,
          const std::array<std::string, 3>& names = {"gate_proj", "up_proj", "down_proj"});
  torch::Tensor forward(const torch::Tensor& x);
  Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
  Linear gate_up_proj{nullptr};  // kFusedGateUp only (gate_proj and up_proj are null then)
};
TORCH_MODULE(MLP);

}  // namespace dsopen::model
