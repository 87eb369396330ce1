// LibTorch version shims: every call whose spelling differs between LibTorch releases lives here.
// Supported: LibTorch 2.4 and newer.
#pragma once

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/version.h>

#include <string>
#include <utility>
#include <vector>

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

// int4 weight-only matmul on the CPU (packed nibbles, bf16 activations). LibTorch 2.6 split these kernels into
// *_for_cpu variants with an [n, k] int32 weight input; before it, int4 models use the dequantizing path.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 6)
inline constexpr bool kHasInt4CpuKernel = true;
inline at::Tensor int4_pack_for_cpu(const at::Tensor& weight_int32, int64_t inner_k_tiles) {
  return at::_convert_weight_to_int4pack_for_cpu(weight_int32, inner_k_tiles);
}
inline at::Tensor int4_mm_for_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t group_size,
                                  const at::Tensor& scale_zeros) {
  return at::_weight_int4pack_mm_for_cpu(x, packed, group_size, scale_zeros);
}
#else
inline constexpr bool kHasInt4CpuKernel = false;
inline at::Tensor int4_pack_for_cpu(const at::Tensor&, int64_t) {
  TORCH_CHECK(false, "int4 CPU kernels need LibTorch 2.6 or newer");
}
inline at::Tensor int4_mm_for_cpu(const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&) {
  TORCH_CHECK(false, "int4 CPU kernels need LibTorch 2.6 or newer");
}
#endif

// safetensors dtypes whose LibTorch scalar type appeared after 2.4 (name, type); the others are mapped directly.
inline std::vector<std::pair<std::string, c10::ScalarType>> newer_safetensors_dtypes() {
  std::vector<std::pair<std::string, c10::ScalarType>> out;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 7)
  out.push_back({"F8_E8M0", c10::ScalarType::Float8_e8m0fnu});
#endif
  return out;
}

}  // namespace dsopen::compat
