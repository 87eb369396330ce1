// Fused ops (model/fused_ops.h) against their unfused compositions: values and gradients, float32 and bfloat16,
// odd sizes (not a multiple of the vector width), strided inputs, partial rotary, chunked head + loss.
#include <catch2/catch.hpp>

#include <functional>
#include <optional>

#include "model/fused_ops.h"
#include "model/layers.h"
#include "utils/compat.h"

using namespace dsopen::model;

namespace {

double max_rel(const torch::Tensor& got, const torch::Tensor& want) {
  auto g = got.to(torch::kFloat64), w = want.to(torch::kFloat64);
  return ((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item<double>();
}

// Runs f on fresh leaf copies of `inputs` with the fused ops on and off; returns outputs and input gradients of
// sum(output * probe) for both.
struct Both {
  torch::Tensor fused, plain;
  std::vector<torch::Tensor> fused_grads, plain_grads;
};
Both run_both(const std::vector<torch::Tensor>& inputs, const std::function<torch::Tensor(std::vector<torch::Tensor>&)>& f) {
  Both r;
  torch::Tensor probe;
  for (bool on : {true, false}) {
    fused::Scope scope(on);
    std::vector<torch::Tensor> leaves;
    for (const auto& x : inputs) leaves.push_back(x.detach().clone().requires_grad_(true));
    auto y = f(leaves);
    if (!probe.defined()) probe = torch::randn(y.sizes(), torch::kFloat32);
    (y.to(torch::kFloat32) * probe).sum().backward();
    std::vector<torch::Tensor> grads;
    for (auto& l : leaves) grads.push_back(l.grad());
    (on ? r.fused : r.plain) = y.detach();
    (on ? r.fused_grads : r.plain_grads) = grads;
  }
  return r;
}

void check_close(const Both& r, double tol) {
  CHECK(r.fused.scalar_type() == r.plain.scalar_type());
  CHECK(r.fused.sizes() == r.plain.sizes());
  CHECK(max_rel(r.fused, r.plain) < tol);
  for (size_t i = 0; i < r.plain_grads.size(); ++i) {
    INFO("gradient of input " << i);
    REQUIRE(r.fused_grads[i].defined());
    CHECK(r.fused_grads[i].scalar_type() == r.plain_grads[i].scalar_type());
    CHECK(max_rel(r.fused_grads[i], r.plain_grads[i]) < tol);
  }
}

}  // namespace

TEST_CASE("fused RMSNorm equals the unfused composition", "[fused]") {
  torch::manual_seed(1);
  for (int64_t D : {37, 256}) {
    for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
      INFO("D " << D << " dtype " << dtype);
      const double tol = dtype == torch::kFloat32 ? 1e-5 : 2e-2;
      RMSNorm norm(D, 1e-6);
      norm->weight.data().uniform_(0.5, 1.5);
      auto x = torch::randn({3, 5, D}).mul(3).to(dtype);
      auto r = run_both({x, norm->weight.detach()}, [&](std::vector<torch::Tensor>& in) {
        norm->weight = in[1];  // the leaf whose gradient is compared
        return norm->forward(in[0]);
      });
      check_close(r, tol);
      // A column slice (MLA's compressed kv half) is read in place.
      auto wide = torch::randn({4, D + 7}).to(dtype);
      auto rs = run_both({wide, norm->weight.detach()}, [&](std::vector<torch::Tensor>& in) {
        norm->weight = in[1];
        return norm->forward(in[0].narrow(1, 0, D));
      });
      check_close(rs, tol);
    }
  }
}

TEST_CASE("fused SwiGLU equals silu(gate) * up, including extreme gates", "[fused]") {
  torch::manual_seed(2);
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    INFO("dtype " << dtype);
    auto gate = (torch::randn({6, 45}) * 4).to(dtype);
    gate[0][0] = 95.0;  // exp overflows without the clamp
    gate[0][1] = -120.0;
    auto up = torch::randn({6, 45}).to(dtype);
    auto r = run_both({gate, up}, [](std::vector<torch::Tensor>& in) { return swiglu(in[0], in[1]); });
    check_close(r, dtype == torch::kFloat32 ? 1e-5 : 2e-2);
    // The halves of one wide projection (GLM's gate_up_proj), read in place.
    auto wide = torch::randn({3, 2, 64}).to(dtype);
    auto rc = run_both({wide}, [](std::vector<torch::Tensor>& in) {
      auto halves = in[0].chunk(2, -1);
      return swiglu(halves[0], halves[1]);
    });
    check_close(rc, dtype == torch::kFloat32 ? 1e-5 : 2e-2);
  }
}

TEST_CASE("fused rotary embedding equals the unfused one in both layouts, partial and per-sequence", "[fused]") {
  torch::manual_seed(3);
  const int64_t B = 2, T = 7, H = 3;
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    for (auto layout : {RopeLayout::kHalf, RopeLayout::kInterleaved}) {
      for (int64_t rope_dim : {16, 8}) {  // 8 of 16: partial rotary (GLM)
        INFO("dtype " << dtype << " interleaved " << (layout == RopeLayout::kInterleaved) << " rope_dim " << rope_dim);
        RopeTable t(rope_dim, 64, 10000.0, RopeScaling{});
        auto [cos, sin] = t.slice(3, T, torch::kCPU);                                 // [T, r/2]
        auto [pcos, psin] = t.gather(torch::randint(0, 60, {B, T}, torch::kLong));  // [B, T, r/2]
        auto x = torch::randn({B, T, H, 16}).to(dtype);
        for (int per_sequence = 0; per_sequence < 2; ++per_sequence) {
          const auto& c = per_sequence ? pcos : cos;
          const auto& s = per_sequence ? psin : sin;
          auto r = run_both({x}, [&](std::vector<torch::Tensor>& in) { return apply_rope(in[0], c, s, layout, rope_dim); });
          check_close(r, dtype == torch::kFloat32 ? 1e-6 : 1e-2);
        }
      }
    }
  }
}

TEST_CASE("fused LM head + cross-entropy equals logits + cross_entropy, z-loss and chunks included", "[fused]") {
  torch::manual_seed(4);
  // V large enough that the 300 rows run in several chunks.
  const int64_t N = 300, H = 24, V = 40000;
  auto hidden = torch::randn({N, H});
  auto weight = torch::randn({V, H}) * 0.2;
  auto targets = torch::randint(0, V, {N}, torch::kLong);
  targets.narrow(0, 10, 20).fill_(-100);
  for (bool bf16 : {false, true}) {
    INFO("bf16 autocast " << bf16);
    std::vector<torch::Tensor> sums_f, sums_p, grads_f, grads_p;
    for (bool fused_path : {true, false}) {
      std::optional<dsopen::compat::AutocastScope> autocast;
      if (bf16) autocast.emplace(c10::DeviceType::CPU, true, torch::kBFloat16);
      auto h = hidden.clone().requires_grad_(true), w = weight.clone().requires_grad_(true);
      torch::Tensor ce, z;
      if (fused_path) {
        auto s = fused::linear_cross_entropy(h, w, targets, true);
        ce = s.ce, z = s.z;
      } else {
        auto logits = torch::nn::functional::linear(h, w).to(torch::kFloat32);
        ce = torch::nn::functional::cross_entropy(
            logits, targets, torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).reduction(torch::kSum));
        z = (logits.logsumexp(-1).square() * targets.ne(-100).to(torch::kFloat32)).sum();
      }
      (0.7 * ce + 0.3 * z).backward();  // different weights: each part's gradient must be right on its own
      (fused_path ? sums_f : sums_p) = {ce.detach(), z.detach()};
      (fused_path ? grads_f : grads_p) = {h.grad(), w.grad()};
    }
    const double tol = bf16 ? 2e-2 : 1e-5;
    CHECK(max_rel(sums_f[0], sums_p[0]) < tol);
    CHECK(max_rel(sums_f[1], sums_p[1]) < tol);
    CHECK(max_rel(grads_f[0], grads_p[0]) < (bf16 ? 5e-2 : 1e-5));
    CHECK(max_rel(grads_f[1], grads_p[1]) < (bf16 ? 5e-2 : 1e-5));
    CHECK(grads_f[1].scalar_type() == torch::kFloat32);
  }
  // Without autograd: the same sums, no gradient buffers.
  torch::NoGradGuard no_grad;
  auto s = fused::linear_cross_entropy(hidden, weight, targets, false);
  auto logits = torch::nn::functional::linear(hidden, weight);
  auto ce = torch::nn::functional::cross_entropy(
      logits, targets, torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).reduction(torch::kSum));
  CHECK(max_rel(s.ce, ce) < 1e-5);
  CHECK(!s.z.defined());
}

TEST_CASE("fused LM head + cross-entropy on zero rows: zero sums and zero gradients", "[fused]") {
  auto hidden = torch::randn({0, 8}).requires_grad_(true), weight = torch::randn({10, 8}).requires_grad_(true);
  auto s = fused::linear_cross_entropy(hidden, weight, torch::empty({0}, torch::kLong), true);
  (s.ce + s.z).backward();
  CHECK(s.ce.item<double>() == 0.0);
  CHECK(weight.grad().abs().max().item<double>() == 0.0);
}

TEST_CASE("fused LM head + cross-entropy refuses targets outside the vocabulary", "[fused]") {
  auto hidden = torch::randn({4, 8}), weight = torch::randn({10, 8});
  for (int64_t bad : {10, -3}) {
    auto targets = torch::tensor({int64_t{1}, int64_t{2}, bad, int64_t{-100}}, torch::kLong);
    try {
      fused::linear_cross_entropy(hidden, weight, targets, false);
      FAIL("no error for target " << bad);
    } catch (const c10::Error& e) {
      CHECK(std::string(e.what_without_backtrace()).find("target " + std::to_string(bad) + " is outside the vocabulary [0, 10)") !=
            std::string::npos);
    }
  }
}

TEST_CASE("DSOPEN_FUSED_OPS switch: off means the unfused composition", "[fused]") {
  auto x = torch::randn({2, 3, 1, 8});
  fused::Scope off(false);
  CHECK(!fused::applies(x));
  CHECK(!fused::rope_applies(x, torch::randn({3, 4}), 8));
  fused::Scope on(true);
  CHECK(fused::applies(x));
  CHECK(fused::rope_applies(x, torch::randn({3, 4}), 8));
  CHECK(!fused::rope_applies(x, torch::randn({3, 3}), 8));  // cos of another width: unfused
}
