#include "train/precision.h"

#include "utils/errors.h"

namespace dsopen::train {

Precision::Precision(const std::string& mode, torch::Device device) : mode_(mode), device_(device) {
  if (mode == "fp16" && !device.is_cuda())
    throw usage_error("train.precision", "fp16 needs a CUDA device", "use bf16 or fp32 on the CPU");
}

void Precision::autocast(std::optional<compat::AutocastScope>& guard) const {
  if (mode_ == "bf16") guard.emplace(device_.type(), true, torch::kBFloat16);
  else if (mode_ == "fp16") guard.emplace(device_.type(), true, torch::kFloat16);
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
