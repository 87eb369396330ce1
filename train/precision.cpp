#include "train/precision.h"

#include "utils/config.h"
#include "utils/errors.h"

namespace dsopen::train {

const std::vector<std::pair<std::string, PrecisionMode>>& precision_names() {
  static const std::vector<std::pair<std::string, PrecisionMode>> names = {
      {"fp32", PrecisionMode::Fp32}, {"bf16", PrecisionMode::Bf16}, {"fp16", PrecisionMode::Fp16}};
  return names;
}

std::string to_string(PrecisionMode mode) { return config::name_of(mode, precision_names()); }

namespace {
PrecisionMode parse_precision(const std::string& name) {
  for (const auto& [n, m] : precision_names())
    if (n == name) return m;
  throw usage_error("train.precision", "'" + name + "' is not one of fp32 | bf16 | fp16");
}
}  // namespace

Precision::Precision(PrecisionMode mode, torch::Device device) : mode_(mode), device_(device) {
  if (mode == PrecisionMode::Fp16 && !device.is_cuda())
    throw usage_error("train.precision", "fp16 needs a CUDA device", "use bf16 or fp32 on the CPU");
}

Precision::Precision(const std::string& mode, torch::Device device) : Precision(parse_precision(mode), device) {}

void Precision::autocast(std::optional<compat::AutocastScope>& guard) const {
  if (mode_ == PrecisionMode::Bf16) guard.emplace(device_.type(), true, torch::kBFloat16);
  else if (mode_ == PrecisionMode::Fp16) guard.emplace(device_.type(), true, torch::kFloat16);
}

void LossScaler::update(bool finite) {
  if (!finite) {
    scale_ = std::max(1.0, scale_ * 0.5);
    good_steps_ = 0;
  } else if (++good_steps_ >= growth_interval_) {
    scale_ *= 2.0;
    good_steps_ = 0;
  }
}

}  // namespace dsopen::train
