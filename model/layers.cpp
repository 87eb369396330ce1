#include "model/layers.h"

#include <cmath>

namespace dsopen::model {

RMSNormImpl::RMSNormImpl(int64_t dim, double eps) : eps_(eps) {
  weight = register_parameter("weight", torch::ones({dim}));
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  auto h = x.to(torch::kFloat32);
  h = h * torch::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps_);
  return weight * h.to(x.scalar_type());
}

double yarn_get_mscale(double scale, double mscale) {
  return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

torch::Tensor rope_inv_freq(int64_t dim, double theta, const RopeScaling& s) {
  auto exponents = torch::arange(0, dim, 2, torch::kFloat64) / static_cast<double>(dim);
  auto freq = 1.0 / torch::pow(theta, exponents);  // [dim/2]
  if (s.type != "yarn") return freq.to(torch::kFloat32);
  // The dimension whose wavelength fits `rotations` times into the original context (YaRN paper, eq. 17).
  auto correction_dim = [&](double rotations) {
    return dim * std::log(s.original_max_position_embeddings / (rotations * 2.0 * M_PI)) / (2.0 * std::log(theta));
  };
  double low = correction_dim(s.beta_fast), high = correction_dim(s.beta_slow);
  if (s.truncate) low = std::floor(low), high = std::ceil(high);
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;  // avoid a division by zero in the ramp
  auto ramp = ((torch::arange(dim / 2, torch::kFloat64) - low) / (high - low)).clamp(0.0, 1.0);
  auto keep = 1.0 - ramp;  // 1: extrapolate (high-frequency dims), 0: interpolate by 1/factor
  freq = freq / s.factor * (1.0 - keep) + freq * keep;
  return freq.to(torch::kFloat32);
}

double rope_cos_sin_scale(const RopeScaling& s) {
  if (s.type != "yarn") return 1.0;
  if (s.attention_factor > 0) return s.attention_factor;
  // DeepSeek's reference: mscale(factor, mscale) / mscale(factor, mscale_all_dim), the latter 1 when absent.
  // (transformers ignores mscale without mscale_all_dim; DeepSeek's files always give both, and then all agree.)
  return yarn_get_mscale(s.factor, s.mscale) / yarn_get_mscale(s.factor, s.mscale_all_dim);
}

double attention_softmax_scale(int64_t qk_head_dim, const RopeScaling& s) {
  double scale = 1.0 / std::sqrt(static_cast<double>(qk_head_dim));
  if (s.type == "yarn" && s.mscale_all_dim > 0) {
    const double m = yarn_get_mscale(s.factor, s.mscale_all_dim);
    scale *= m * m;
  }
  return scale;
}

RopeTable::RopeTable(int64_t dim, int64_t max_positions, double theta, const RopeScaling& scaling)
    : max_positions_(max_positions), scale_(rope_cos_sin_scale(scaling)),
      inv_freq_(rope_inv_freq(dim, theta, scaling).to(torch::kFloat64)) {
  std::lock_guard<std::mutex> lock(*mutex_);
  ensure(std::min<int64_t>(max_positions, 4096));
}

void RopeTable::ensure(int64_t positions) const {  // the caller holds mutex_
  const int64_t have = cos_.defined() ? cos_.size(0) : 0;
  if (positions <= have) return;
  const int64_t want = std::min(max_positions_, std::max(positions, 2 * have));
  auto angles = torch::outer(torch::arange(have, want, torch::kFloat64), inv_freq_);  // [new rows, dim/2]
  auto c = (angles.cos() * scale_).to(torch::kFloat32), s = (angles.sin() * scale_).to(torch::kFloat32);
  cos_ = have ? torch::cat({cos_, c}) : c;
  sin_ = have ? torch::cat({sin_, s}) : s;
}

std::pair<torch::Tensor, torch::Tensor> RopeTable::slice(int64_t start, int64_t len,
                                                         const torch::Device& device) const {
  TORCH_CHECK(start + len <= max_positions_, "position ", start + len, " exceeds max_position_embeddings (",
              max_positions_, "); shorten the input or raise max_position_embeddings");
  std::lock_guard<std::mutex> lock(*mutex_);
  ensure(start + len);
  auto c = cos_.narrow(0, start, len), s = sin_.narrow(0, start, len);
  if (c.device() != device) c = c.to(device), s = s.to(device);
  return {c, s};
}

std::pair<torch::Tensor, torch::Tensor> RopeTable::gather(const torch::Tensor& positions) const {
  const int64_t highest = positions.max().item<int64_t>();
  TORCH_CHECK(highest < max_positions_, "position exceeds max_position_embeddings (", max_positions_, ")");
  std::lock_guard<std::mutex> lock(*mutex_);
  ensure(highest + 1);
  auto flat = positions.reshape({-1}).to(torch::kCPU);
  auto sizes = positions.sizes().vec();
  sizes.push_back(cos_.size(1));
  return {cos_.index_select(0, flat).view(sizes).to(positions.device()),
          sin_.index_select(0, flat).view(sizes).to(positions.device())};
}

torch::Tensor apply_rope_half(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  auto xf = x.to(torch::kFloat32);
  auto halves = xf.split(half, -1);  // one split: its backward concatenates instead of zero-filling per half
  const auto& x1 = halves[0];
  const auto& x2 = halves[1];
  // [T, 1, dim/2] or [B, T, 1, dim/2] broadcasts over [B, T, H, dim/2]
  auto c = cos.unsqueeze(cos.dim() - 1), s = sin.unsqueeze(sin.dim() - 1);
  return torch::cat({x1 * c - x2 * s, x2 * c + x1 * s}, -1).to(x.scalar_type());
}

torch::Tensor apply_rope_interleaved(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  auto sizes = x.sizes().vec();
  sizes.back() /= 2;
  sizes.push_back(2);
  auto xf = x.to(torch::kFloat32).reshape(sizes);  // [..., dim/2, 2]
  auto pair = xf.unbind(-1);  // not two selects, whose backwards would each zero-fill the whole input
  const auto& x1 = pair[0];
  const auto& x2 = pair[1];
  auto c = cos.unsqueeze(cos.dim() - 1), s = sin.unsqueeze(sin.dim() - 1);
  return torch::stack({x1 * c - x2 * s, x2 * c + x1 * s}, -1).flatten(-2).to(x.scalar_type());
}

MLPImpl::MLPImpl(int64_t hidden, int64_t intermediate) {
  gate_proj = register_module("gate_proj", linear(hidden, intermediate));
  up_proj = register_module("up_proj", linear(hidden, intermediate));
  down_proj = register_module("down_proj", linear(intermediate, hidden));
}

torch::Tensor MLPImpl::forward(const torch::Tensor& x) {
  return down_proj(torch::silu(gate_proj(x)) * up_proj(x));
}

}  // namespace dsopen::model
