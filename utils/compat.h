// LibTorch version shims: every call whose spelling differs between LibTorch releases lives here.
// Supported: LibTorch 2.4 and newer.
#pragma once

#include <ATen/autocast_mode.h>
#include <torch/version.h>

static_assert(TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4),
              "DeepSeek-Open needs LibTorch 2.4 or newer");

namespace dsopen::compat {

// Autocast state per device type. 2.4 introduced the device-typed API; the per-device helpers
// (set_autocast_cpu_enabled, ...) it replaced were removed later.
inline void set_autocast(c10::DeviceType device, bool enabled, c10::ScalarType dtype) {
  at::autocast::set_autocast_enabled(device, enabled);
  at::autocast::set_autocast_dtype(device, dtype);
}
inline bool autocast_enabled(c10::DeviceType device) { return at::autocast::is_autocast_enabled(device); }
inline void clear_autocast_cache() { at::autocast::clear_cache(); }

// Turns autocast off on CPU and CUDA for a scope (numerically sensitive code such as MoE routing runs in fp32),
// restoring the previous state on exit.
class AutocastOff {
public:
  AutocastOff()
      : cpu_(at::autocast::is_autocast_enabled(c10::DeviceType::CPU)),
        cuda_(at::autocast::is_autocast_enabled(c10::DeviceType::CUDA)) {
    at::autocast::set_autocast_enabled(c10::DeviceType::CPU, false);
    at::autocast::set_autocast_enabled(c10::DeviceType::CUDA, false);
  }
  ~AutocastOff() {
    at::autocast::set_autocast_enabled(c10::DeviceType::CPU, cpu_);
    at::autocast::set_autocast_enabled(c10::DeviceType::CUDA, cuda_);
  }
  AutocastOff(const AutocastOff&) = delete;
  AutocastOff& operator=(const AutocastOff&) = delete;

private:
  bool cpu_, cuda_;
};

// Enables autocast to `dtype` on `device` for a scope (the precision guard of training and inference).
class AutocastOn {
public:
  AutocastOn(c10::DeviceType device, c10::ScalarType dtype)
      : device_(device), was_(at::autocast::is_autocast_enabled(device)),
        was_dtype_(at::autocast::get_autocast_dtype(device)) {
    set_autocast(device, true, dtype);
  }
  ~AutocastOn() {
    set_autocast(device_, was_, was_dtype_);
    if (!was_) clear_autocast_cache();
  }
  AutocastOn(const AutocastOn&) = delete;
  AutocastOn& operator=(const AutocastOn&) = delete;

private:
  c10::DeviceType device_;
  bool was_;
  c10::ScalarType was_dtype_;
};

}  // namespace dsopen::compat
