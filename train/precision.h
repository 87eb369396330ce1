// Training precision: fp32, bf16 autocast (CPU and CUDA), or fp16 autocast with dynamic loss scaling (CUDA).
// Master weights and optimizer state stay fp32 in every mode.
#pragma once

#include <torch/torch.h>

#include <optional>
#include <string>

#include "utils/compat.h"

namespace dsopen::train {

class Precision {
public:
  // Usage error when the mode cannot run on `device` (fp16 on CPU).
  Precision(const std::string& mode, torch::Device device);

  // Enters autocast for the forward pass into `guard` (left empty for fp32); leaving the scope restores.
  void autocast(std::optional<compat::AutocastScope>& guard) const;

  // Dynamic loss scaling (fp16): multiply the loss by scale() before backward, divide the gradients by it after.
  bool scaling() const { return mode_ == "fp16"; }
  double scale() const { return scale_; }
  // After a step: on overflow halve the scale (the step is skipped by the caller); after `growth_interval`
  // finite steps double it.
  void update(bool finite);
  void set_state(double scale, int64_t good_steps) { scale_ = scale, good_steps_ = good_steps; }
  int64_t good_steps() const { return good_steps_; }

private:
  std::string mode_;
  torch::Device device_;
  double scale_ = 1.0;
  int64_t good_steps_ = 0;
  static constexpr int64_t growth_interval = 2000;
};

}  // namespace dsopen::train
