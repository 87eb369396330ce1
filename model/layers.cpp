#include "model/layers.h"

#include <cmath>

#include "model/fused_ops.h"

namespace dsopen::model {

RMSNormImpl::RMSNormImpl(int64_t dim, double eps) : eps_(eps) {
  weight = register_parameter("weight", torch::ones({dim}));
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  if (fused::applies(x) && fused::applies(weight)) return fused::rms_norm(x, weight, eps_);
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
  if (s.type == "linear") return (freq / s.factor).to(torch::kFloat32);
  if (s.type == "llama3") {
    const double orig = static_cast<double>(s.original_max_position_embeddings);
    const double low_wavelen = orig / s.low_freq_factor, high_wavelen = orig / s.high_freq_factor;
    auto wavelen = 2.0 * M_PI / freq;
    auto scaled = torch::where(wavelen > low_wavelen, freq / s.factor, freq);
    auto smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
    auto blended = (1.0 - smooth) * scaled / s.factor + smooth * scaled;
    auto medium = (wavelen >= high_wavelen).logical_and(wavelen <= low_wavelen);
    return torch::where(medium, blended, scaled).to(torch::kFloat32);
  }
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
  // DeepSeek's reference: mscale(factor, mscale) / mscale(factor, mscale_all_dim), mscale 1 and the denominator 1
  // when absent. (transformers ignores one of the two without the other; ModelConfig::validate refuses that for the
  // families transformers is the reference of, and with both or neither all agree.)
  return yarn_get_mscale(s.factor, s.mscale > 0 ? s.mscale : 1.0) / yarn_get_mscale(s.factor, s.mscale_all_dim);
}

double attention_softmax_scale(int64_t qk_head_dim, const RopeScaling& s) {
  double scale = 1.0 / std::sqrt(static_cast<double>(qk_head_dim));
  if (s.type == "yarn" && s.mscale_all_dim > 0) {
    const double m = yarn_get_mscale(s.factor, s.mscale_all_dim);
    scale *= m * m;
  }
  return scale;
}

RopeTable::RopeTable(int64_t dim, int64_t max_positions, double theta, const RopeScaling& scaling,
                     int64_t trained_positions)
    : dim_(dim), trained_positions_(trained_positions > 0 ? trained_positions : max_positions), theta_(theta),
      dynamic_factor_(scaling.type == "dynamic" ? scaling.factor : 0.0), max_positions_(max_positions),
      scale_(rope_cos_sin_scale(scaling)), inv_freq_(rope_inv_freq(dim, theta, scaling).to(torch::kFloat64)) {
  std::lock_guard<std::mutex> lock(*mutex_);
  ensure(std::min<int64_t>(std::min(max_positions, trained_positions_), 4096));
}

std::pair<torch::Tensor, torch::Tensor> RopeTable::dynamic_rows(const torch::Tensor& positions, int64_t reach) const {
  const double L = static_cast<double>(trained_positions_), f = dynamic_factor_;
  const double base = theta_ * std::pow(f * static_cast<double>(reach) / L - (f - 1.0),
                                        static_cast<double>(dim_) / static_cast<double>(dim_ - 2));
  auto inv_freq = rope_inv_freq(dim_, base, RopeScaling{}).to(torch::kFloat64);
  auto angles = positions.to(torch::kCPU, torch::kFloat64).unsqueeze(-1) * inv_freq;  // [..., dim/2]
  return {angles.cos().to(torch::kFloat32), angles.sin().to(torch::kFloat32)};
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
  if (dynamic_factor_ > 0 && start + len > trained_positions_) {
    auto [c, s] = dynamic_rows(torch::arange(start, start + len, torch::kLong), start + len);
    return {c.to(device), s.to(device)};
  }
  std::lock_guard<std::mutex> lock(*mutex_);
  ensure(start + len);
  auto c = cos_.narrow(0, start, len), s = sin_.narrow(0, start, len);
  if (c.device() != device) c = c.to(device), s = s.to(device);
  return {c, s};
}

std::pair<torch::Tensor, torch::Tensor> RopeTable::table(int64_t positions) const {
  if (positions > max_positions_ || (dynamic_factor_ > 0 && positions > trained_positions_)) return {};
  std::lock_guard<std::mutex> lock(*mutex_);
  ensure(positions);
  return {cos_, sin_};
}

std::pair<torch::Tensor, torch::Tensor> RopeTable::gather(const torch::Tensor& positions) const {
  const int64_t highest = positions.max().item<int64_t>();
  TORCH_CHECK(highest < max_positions_, "position exceeds max_position_embeddings (", max_positions_, ")");
  if (dynamic_factor_ > 0 && highest + 1 > trained_positions_) {
    auto [c, s] = dynamic_rows(positions, highest + 1);
    return {c.to(positions.device()), s.to(positions.device())};
  }
  std::lock_guard<std::mutex> lock(*mutex_);
  ensure(highest + 1);
  auto flat = positions.reshape({-1}).to(torch::kCPU);
  auto sizes = positions.sizes().vec();
  sizes.push_back(cos_.size(1));
  return {cos_.index_select(0, flat).view(sizes).to(positions.device()),
          sin_.index_select(0, flat).view(sizes).to(positions.device())};
}

torch::Tensor apply_rope_half(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  if (fused::rope_applies(x, cos, x.size(-1))) return fused::rope(x, cos, sin, false, x.size(-1));
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
  if (fused::rope_applies(x, cos, x.size(-1))) return fused::rope(x, cos, sin, true, x.size(-1));
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

torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                         RopeLayout layout, int64_t rope_dim) {
  auto rotate = [&](const torch::Tensor& part) {
    return layout == RopeLayout::kInterleaved ? apply_rope_interleaved(part, cos, sin) : apply_rope_half(part, cos, sin);
  };
  const int64_t d = x.size(-1);
  if (fused::rope_applies(x, cos, rope_dim)) return fused::rope(x, cos, sin, layout == RopeLayout::kInterleaved, rope_dim);
  if (rope_dim == d) return rotate(x);
  auto parts = x.split_with_sizes({rope_dim, d - rope_dim}, -1);
  return torch::cat({rotate(parts[0]), parts[1]}, -1);
}

MLPImpl::MLPImpl(int64_t hidden, int64_t intermediate, MLPKind kind, const std::array<std::string, 3>& names) {
  if (kind == MLPKind::kFusedGateUp) {
    gate_up_proj = register_module("gate_up_proj", linear(hidden, 2 * intermediate));
  } else {
    gate_proj = register_module(names[0], linear(hidden, intermediate));
    up_proj = register_module(names[1], linear(hidden, intermediate));
  }
  down_proj = register_module(names[2], linear(intermediate, hidden));
}

torch::Tensor MLPImpl::forward(const torch::Tensor& x) {
  if (gate_up_proj) {
    auto gate_up = gate_up_proj(x).chunk(2, -1);  // [.., I] gate, [.., I] up
    return down_proj(swiglu(gate_up[0], gate_up[1]));
  }
  return down_proj(swiglu(gate_proj(x), up_proj(x)));
}

torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up) {
  if (fused::applies(gate) && gate.scalar_type() == up.scalar_type() && gate.sizes() == up.sizes())
    return fused::swiglu(gate, up);
  return torch::silu(gate) * up;
}

}  // namespace dsopen::model
