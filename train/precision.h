// Training precision: fp32, bf16 autocast (CPU and CUDA), or fp16 autocast with dynamic loss scaling (CUDA); `auto`
// picks fp32 or bf16 for the machine at hand (choose_precision). Master weights and optimizer state stay fp32 in
// every mode.
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

enum class PrecisionMode { Fp32, Bf16, Fp16, Auto };
const std::vector<std::pair<std::string, PrecisionMode>>& precision_names();  // "fp32", "bf16", "fp16", "auto"
std::string to_string(PrecisionMode mode);

// What `auto` became, and why (one log line: the device, the measurements).
struct PrecisionChoice {
  PrecisionMode mode;
  std::string reason;
  double gemm_flops = 0;  // CPU: the measured GEMM rate of `mode` (FLOP/s), 0 when not measured
};

// Resolves `auto` (other modes are returned as they are, reason empty):
//   CUDA  bf16 on compute capability 8.0 and newer (bf16 tensor cores), else fp32 (fp16 stays an explicit choice:
//         it needs loss scaling)
//   CPU   bf16 when a bf16 GEMM of the model's own shape ([512, hidden] x [hidden, intermediate]) runs at least
//         1.3x faster than the float32 one, measured here (~0.2 s). CPUs differ: with AMX or AVX512-BF16 a bf16 GEMM
//         runs 2-5x float32, without them LibTorch emulates it at about half float32's speed; autocast's casts and
//         the float32 parts of a step take some of the gain, hence the margin.
PrecisionChoice choose_precision(PrecisionMode requested, torch::Device device, int64_t hidden, int64_t intermediate);

// FLOP/s of the same GEMM in `mode` (fp32 or bf16) on the CPU: the peak MFU is reported against when
// train.peak_tflops is not set (a CPU has no datasheet figure LibTorch could reach).
double measured_gemm_flops(PrecisionMode mode, int64_t hidden, int64_t intermediate);

class Precision {
public:
  // Usage error when the mode cannot run on `device` (fp16 on CPU); `auto` must be resolved first.
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
