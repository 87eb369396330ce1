// Training precision: fp32, bf16 autocast (CPU and CUDA), or fp16 autocast with dynamic loss scaling (CUDA).
// Master weights and optimizer state stay fp32 in every mode.
#pragma once

#include <torch/torch.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "utils/compat.h"

namespace dsopen::train {

// Dynamic loss scaling for fp16: multiply the loss by scale() before backward and divide the gradients by it
// after. On overflow the scale halves (the caller skips the step); after `growth_interval` finite steps in a row
// it doubles.
class LossScaler {
public:
  explicit LossScaler(double initial = 65536.0, int64_t growth_interval = 2000)
      : scale_(initial), growth_interval_(growth_interval) {}
  double scale() const { return scale_; }
  int64_t good_steps() const { return good_steps_; }
  void update(bool finite);
  void set_state(double scale, int64_t good_steps) { scale_ = scale, good_steps_ = good_steps; }

private:
  double scale_;
  int64_t growth_interval_, good_steps_ = 0;
};

enum class PrecisionMode { Fp32, Bf16, Fp16 };
const std::vector<std::pair<std::string, PrecisionMode>>& precision_names();  // "fp32", "bf16", "fp16"
std::string to_string(PrecisionMode mode);

class Precision {
public:
  // Usage error when the mode cannot run on `device` (fp16 on CPU).
  Precision(PrecisionMode mode, torch::Device device);
  // The same from a name of precision_names() (a usage error for any other).
  Precision(const std::string& mode, torch::Device device);

  // Enters autocast for the forward pass into `guard` (left empty for fp32); leaving the scope restores.
  void autocast(std::optional<compat::AutocastScope>& guard) const;

  // Loss scaling is on for fp16 only; otherwise scale() is 1 and update() does nothing.
  bool scaling() const { return mode_ == PrecisionMode::Fp16; }
  PrecisionMode mode() const { return mode_; }
  double scale() const { return scaling() ? scaler_.scale() : 1.0; }
  void update(bool finite) {
    if (scaling()) scaler_.update(finite);
  }
  void set_state(double scale, int64_t good_steps) { scaler_.set_state(scale, good_steps); }
  int64_t good_steps() const { return scaler_.good_steps(); }

private:
  PrecisionMode mode_;
  torch::Device device_;
  LossScaler scaler_;
};

}  // namespace dsopen::train
