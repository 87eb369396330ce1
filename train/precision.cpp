#include "train/precision.h"

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "utils/config.h"
#include "utils/errors.h"

#ifdef DSOPEN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace dsopen::train {

const std::vector<std::pair<std::string, PrecisionMode>>& precision_names() {
  static const std::vector<std::pair<std::string, PrecisionMode>> names = {
      {"fp32", PrecisionMode::Fp32}, {"bf16", PrecisionMode::Bf16}, {"fp16", PrecisionMode::Fp16},
      {"auto", PrecisionMode::Auto}};
  return names;
}

std::string to_string(PrecisionMode mode) { return config::name_of(mode, precision_names()); }

namespace {
PrecisionMode parse_precision(const std::string& name) {
  for (const auto& [n, m] : precision_names())
    if (n == name) return m;
  throw usage_error("train.precision", "'" + name + "' is not one of fp32 | bf16 | fp16 | auto");
}

// The CPU flags that make bf16 GEMMs fast, as /proc/cpuinfo names them ("" when none or unreadable).
std::string bf16_cpu_flags() {
  std::ifstream in("/proc/cpuinfo");
  std::string line, found;
  while (std::getline(in, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    std::istringstream words(line.substr(line.find(':') + 1));
    for (std::string w; words >> w;)
      if (w == "amx_bf16" || w == "avx512_bf16") found += (found.empty() ? "" : " ") + w;
    break;
  }
  return found;
}

// GFLOP/s of x [M, K] @ w [K, N] in `dtype`: ~20 ms of warm-up (first calls pay for packing and thread start-up),
// then the best of three ~25 ms tries, so that a moment of contention from another process does not decide.
double gemm_gflops(int64_t M, int64_t K, int64_t N, torch::Dtype dtype) {
  torch::NoGradGuard no_grad;
  auto x = torch::randn({M, K}).to(dtype), w = torch::randn({K, N}).to(dtype);
  auto y = torch::mm(x, w);
  auto timed = [&](double seconds_wanted) {
    int64_t reps = 0;
    const auto start = std::chrono::steady_clock::now();
    double seconds = 0;
    while (seconds < seconds_wanted || reps < 2) {
      torch::mm_out(y, x, w);
      ++reps;
      seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    return 2.0 * static_cast<double>(M * K * N) * static_cast<double>(reps) / seconds / 1e9;
  };
  timed(0.02);
  double best = 0;
  for (int t = 0; t < 3; ++t) best = std::max(best, timed(0.025));
  return best;
}
}  // namespace

PrecisionChoice choose_precision(PrecisionMode requested, torch::Device device, int64_t hidden, int64_t intermediate) {
  if (requested != PrecisionMode::Auto) return {requested, ""};
  if (device.is_cuda()) {
#ifdef DSOPEN_WITH_CUDA
    const int major = at::cuda::getDeviceProperties(device.index())->major;
#else
    const int major = 0;
#endif
    if (major >= 8) return {PrecisionMode::Bf16, "compute capability " + std::to_string(major) + ".x has bf16 tensor cores"};
    return {PrecisionMode::Fp32, "compute capability " + std::to_string(major) + ".x has no bf16 tensor cores"};
  }
  const int64_t K = std::max<int64_t>(hidden, 64), N = std::max<int64_t>(intermediate, 64);
  const double fp32 = measured_gemm_flops(PrecisionMode::Fp32, hidden, intermediate) / 1e9;
  const double bf16 = measured_gemm_flops(PrecisionMode::Bf16, hidden, intermediate) / 1e9;
  const std::string flags = bf16_cpu_flags();
  char buf[200];
  std::snprintf(buf, sizeof buf, "a [512, %lld] x [%lld, %lld] GEMM runs %.0f GFLOP/s in bf16, %.0f in fp32 (bf16 when >= 1.3x; CPU flags: %s)",
                static_cast<long long>(K), static_cast<long long>(K), static_cast<long long>(N), bf16, fp32,
                flags.empty() ? "no amx_bf16 or avx512_bf16" : flags.c_str());
  const bool use_bf16 = bf16 >= 1.3 * fp32;
  return {use_bf16 ? PrecisionMode::Bf16 : PrecisionMode::Fp32, buf, (use_bf16 ? bf16 : fp32) * 1e9};
}

double measured_gemm_flops(PrecisionMode mode, int64_t hidden, int64_t intermediate) {
  const int64_t K = std::max<int64_t>(hidden, 64), N = std::max<int64_t>(intermediate, 64);
  return gemm_gflops(512, K, N, mode == PrecisionMode::Fp32 ? torch::kFloat32 : torch::kBFloat16) * 1e9;
}

Precision::Precision(PrecisionMode mode, torch::Device device) : mode_(mode), device_(device) {
  TORCH_CHECK(mode != PrecisionMode::Auto, "Precision: resolve auto with choose_precision first");
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
