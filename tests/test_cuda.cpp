// The CUDA paths, checked against the CPU: forward (MLA + MoE + MTP and dense GQA), a training step with the flat
// AdamW (on-device and with the optimizer offloaded to pinned host memory), bf16 autocast, cached decoding, and an
// expert-parallel MoE block's dispatch on CUDA tensors.
// Without a CUDA device the executable reports itself skipped (exit 77, which ctest counts as skipped).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <functional>

#include "model/fused_ops.h"
#include "model/layers.h"
#include "model/registry.h"
#include "model/transformer.h"
#include "tests/split_moe_check.h"
#include "train/optimizer.h"
#include "utils/compat.h"

using namespace dsopen;

namespace {

model::ModelConfig test_config(bool moe) {
  model::ModelConfig c = *model::find_flavor(moe ? "debug" : "tiny-dense");
  if (!moe) {
    c.num_hidden_layers = 2;
    c.num_key_value_heads = 2;  // GQA
  }
  return c;
}

model::CausalLM make(const model::ModelConfig& c, torch::Device d) {
  torch::manual_seed(7);
  model::CausalLM m(c);
  m->to(d);
  return m;
}

torch::Tensor ids_for(const model::ModelConfig& c) {
  torch::manual_seed(3);
  return torch::randint(3, c.vocab_size, {2, 24}, torch::kLong);
}

double rel(const torch::Tensor& a, const torch::Tensor& b) {
  return ((a.cpu().to(torch::kFloat64) - b.cpu().to(torch::kFloat64)).norm() / b.cpu().to(torch::kFloat64).norm()).item<double>();
}

}  // namespace

TEST_CASE("CUDA forward equals the CPU forward (fp32) and bf16 autocast stays close", "[cuda]") {
  for (bool moe : {true, false}) {
    const auto c = test_config(moe);
    auto ids = ids_for(c);
    auto cpu = make(c, torch::kCPU), gpu = make(c, torch::kCUDA);
    cpu->eval();
    gpu->eval();
    torch::NoGradGuard ng;
    auto want = cpu->forward(ids).logits;
    auto got = gpu->forward(ids.cuda()).logits;
    CHECK(rel(got, want) < 1e-4);
    compat::AutocastScope ac(torch::kCUDA, true, torch::kBFloat16);
    CHECK(rel(gpu->forward(ids.cuda()).logits.to(torch::kFloat), want) < 5e-2);
  }
}

TEST_CASE("CUDA cached decoding equals the full forward", "[cuda]") {
  const auto c = test_config(true);
  auto m = make(c, torch::kCUDA);
  m->eval();
  torch::NoGradGuard ng;
  auto ids = ids_for(c).cuda();
  auto full = m->forward(ids).logits;
  model::KVCache cache = m->make_cache(2, 24);
  std::vector<torch::Tensor> parts;
  parts.push_back(m->forward({ids.narrow(1, 0, 10), {}, &cache}).logits);
  for (int64_t t = 10; t < 24; ++t) parts.push_back(m->forward({ids.narrow(1, t, 1), {}, &cache}).logits);
  CHECK(rel(torch::cat(parts, 1), full) < 1e-4);
}

TEST_CASE("a CUDA training step (on-device and offloaded AdamW) equals the CPU step", "[cuda]") {
  const auto c = test_config(true);
  auto ids = ids_for(c);
  auto step = [&](torch::Device d, bool offload) {
    auto m = make(c, d);
    std::vector<std::pair<std::string, torch::Tensor>> named;
    for (auto& p : m->named_parameters()) named.push_back({p.key(), p.value()});
    train::ShardingOptions sh;
    sh.offload = offload;
    train::FlatAdamW opt(named, {}, sh);
    for (int i = 0; i < 3; ++i) {
      opt.zero_grad();
      auto out = m->forward(ids.to(d), ids.to(d));
      (out.ce_sum / out.n_targets + out.aux_loss).backward();
      opt.step(1e-3);
    }
    return opt.groups()[0].params.cpu();
  };
  auto want = step(torch::kCPU, false);
  CHECK(rel(step(torch::kCUDA, false), want) < 1e-4);
  CHECK(rel(step(torch::kCUDA, true), want) < 1e-4);
}

TEST_CASE("expert parallelism on CUDA: a MoE block split over two ranks equals the whole block", "[cuda][expert_parallel]") {
  // Two threads on one GPU with an in-memory all-to-all: the dispatch, regrouping and combine on CUDA tensors
  // (the NCCL all-to-all itself needs two GPUs).
  dsopen::testing::check_split_moe_block(torch::Device(torch::kCUDA, 0), torch::kFloat32);
  dsopen::testing::check_split_moe_block(torch::Device(torch::kCUDA, 0), torch::kBFloat16);
}

TEST_CASE("CUDA fused kernels equal the CPU ones: RMSNorm, SwiGLU, rope, head + loss, values and gradients", "[cuda][fused]") {
  REQUIRE(model::fused::applies(torch::zeros({2, 2}, torch::kCUDA)));  // the kernels are compiled in
  torch::manual_seed(11);
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    INFO("dtype " << dtype);
    const double tol = dtype == torch::kFloat32 ? 1e-5 : 2e-2;
    // Each op on both devices from the same leaves; outputs and input gradients compared.
    auto both = [&](const std::vector<torch::Tensor>& inputs,
                    const std::function<torch::Tensor(std::vector<torch::Tensor>&)>& f) {
      std::vector<std::vector<torch::Tensor>> grads;
      std::vector<torch::Tensor> outs;
      torch::Tensor probe;
      for (auto device : {torch::Device(torch::kCPU), torch::Device(torch::kCUDA)}) {
        std::vector<torch::Tensor> leaves;
        for (const auto& x : inputs) leaves.push_back(x.to(device).detach().requires_grad_(true));
        auto y = f(leaves);
        if (!probe.defined()) probe = torch::randn(y.sizes());
        (y.to(torch::kFloat32) * probe.to(device)).sum().backward();
        outs.push_back(y.detach().cpu());
        grads.emplace_back();
        for (auto& l : leaves) grads.back().push_back(l.grad().cpu());
      }
      CHECK(rel(outs[1], outs[0]) < tol);
      for (size_t i = 0; i < grads[0].size(); ++i) CHECK(rel(grads[1][i], grads[0][i]) < tol);
    };
    both({torch::randn({300, 96}).to(dtype), torch::rand({96}) + 0.5}, [](std::vector<torch::Tensor>& in) {
      return model::fused::rms_norm(in[0], in[1], 1e-6);
    });
    both({torch::randn({5, 70}).to(dtype) * 4, torch::randn({5, 70}).to(dtype)}, [](std::vector<torch::Tensor>& in) {
      return model::fused::swiglu(in[0], in[1]);
    });
    model::RopeTable table(8, 64, 10000.0, model::RopeScaling{});
    auto [cos, sin] = table.slice(0, 6, torch::kCPU);
    for (bool interleaved : {false, true})
      both({torch::randn({2, 6, 3, 12}).to(dtype)}, [&](std::vector<torch::Tensor>& in) {
        return model::fused::rope(in[0], cos.to(in[0].device()), sin.to(in[0].device()), interleaved, 8);
      });
  }
  // Head + loss: the ATen softmax path on CUDA against the CPU kernel.
  auto hidden = torch::randn({100, 16}), weight = torch::randn({500, 16}) * 0.3;
  auto targets = torch::randint(0, 500, {100}, torch::kLong);
  targets.narrow(0, 0, 7).fill_(-100);
  std::vector<torch::Tensor> sums, grads;
  for (auto device : {torch::Device(torch::kCPU), torch::Device(torch::kCUDA)}) {
    auto h = hidden.to(device).requires_grad_(true), w = weight.to(device).requires_grad_(true);
    auto s = model::fused::linear_cross_entropy(h, w, targets.to(device), true);
    (s.ce + 0.5 * s.z).backward();
    sums.push_back(torch::stack({s.ce, s.z}).cpu());
    grads.push_back(h.grad().cpu());
    grads.push_back(w.grad().cpu());
  }
  CHECK(rel(sums[1], sums[0]) < 1e-5);
  CHECK(rel(grads[2], grads[0]) < 1e-4);
  CHECK(rel(grads[3], grads[1]) < 1e-4);
}

int main(int argc, char** argv) {
  if (!torch::cuda::is_available()) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
