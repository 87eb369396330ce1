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

// Sets the autocast state of one device type for a scope and restores the previous state on exit. Used for the
// precision guard (enabled, bf16), for fp32 islands such as MoE routing (disabled), and to replay a saved state.
class AutocastScope {
public:
  AutocastScope(c10::DeviceType device, bool enabled, c10::ScalarType dtype = c10::ScalarType::BFloat16)
      : device_(device), was_(autocast_enabled(device)), was_dtype_(at::autocast::get_autocast_dtype(device)) {
    set_autocast(device, enabled, dtype);
  }
  ~AutocastScope() {
    set_autocast(device_, was_, was_dtype_);
    if (!was_) clear_autocast_cache();  // cached low-precision weight copies die with the outermost scope
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

private:
  c10::DeviceType device_;
  bool was_;
  c10::ScalarType was_dtype_;
};

}  // namespace dsopen::compat
