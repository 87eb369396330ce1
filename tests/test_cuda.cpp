// The CUDA paths, checked against the CPU: forward (MLA + MoE + MTP and dense GQA), a training step with the flat
// AdamW (on-device and with the optimizer offloaded to pinned host memory), bf16 autocast, and cached decoding.
// Without a CUDA device the executable reports itself skipped (exit 77, which ctest counts as skipped).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "model/registry.h"
#include "model/transformer.h"
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

int main(int argc, char** argv) {
  if (!torch::cuda::is_available()) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
