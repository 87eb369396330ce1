// Expert-parallel building blocks in one process: the expert shares of a model built inside an
// ExpertPlacementScope equal the whole model's experts by name; the MoE forward and backward with its experts
// split over two "ranks" (two models in two threads, rows moved by an in-memory all-to-all) equal the whole
// block's; the received-row layout; optimizer state moving between expert-parallel layouts by parameter name;
// the memory and traffic formulas; the MoE capacity factor against a per-expert reference. Real processes with
// Gloo are tests/dist_test.sh.
#include <catch2/catch.hpp>

#include "model/expert_parallel.h"
#include "model/info.h"
#include "model/registry.h"
#include "model/transformer.h"
#include "tests/split_moe_check.h"
#include "tests/test_helpers.h"
#include "train/optimizer.h"

using namespace dsopen;
using dsopen::testing::error_of;

namespace {

model::ModelConfig debug_moe() {
  auto c = *model::find_flavor("debug");
  c.aux_loss_alpha = 0.01;
  return c;
}

}  // namespace

TEST_CASE("a model built with a share of the experts holds exactly those of the whole model", "[expert_parallel]") {
  const auto c = debug_moe();
  torch::manual_seed(5);
  model::CausalLM whole(c);
  const auto all = whole->named_parameters();
  int64_t routed = 0;
  for (const auto& p : all) routed += model::is_routed_expert_name(p.key()) ? p.value().numel() : 0;
  CHECK(routed == model::count_parameters(c).routed);  // the formula against the built model
  for (int rank = 0; rank < 4; ++rank) {
    torch::manual_seed(5);
    model::ExpertPlacementScope scope({rank, 4});
    model::CausalLM part(c);
    int64_t held = 0;
    for (const auto& p : part->named_parameters()) {
      REQUIRE(all.contains(p.key()));
      CHECK(torch::equal(p.value(), all[p.key()]));  // replicated and expert weights alike
      if (model::is_routed_expert_name(p.key())) {
        held += p.value().numel();
        // Expert e lives on rank e / 2 (8 experts over 4 ranks).
        const auto pos = p.key().find(".experts.") + 9;
        CHECK(std::stoi(p.key().substr(pos)) / 2 == rank);
      }
    }
    CHECK(held * 4 == routed);
    CHECK(part->expert_placement().rank == rank);
    CHECK_THROWS_AS(part->moe_blocks().front().moe->expert(rank == 0 ? 7 : 0), std::out_of_range);
  }
  CHECK(model::ExpertPlacementScope::current().size == 1);  // scopes restore
}

TEST_CASE("routed-expert names: DeepSeek, Qwen, Mixtral and adapters, never shared experts", "[expert_parallel]") {
  CHECK(model::is_routed_expert_name("model.layers.3.mlp.experts.12.gate_proj.weight"));
  CHECK(model::is_routed_expert_name("model.layers.3.block_sparse_moe.experts.0.w1.weight"));
  CHECK(model::is_routed_expert_name("mtp.0.mlp.experts.7.down_proj.weight"));
  CHECK(model::is_routed_expert_name("base_model.model.model.layers.1.mlp.experts.3.up_proj.lora_A.weight"));
  CHECK_FALSE(model::is_routed_expert_name("model.layers.3.mlp.shared_experts.gate_proj.weight"));
  CHECK_FALSE(model::is_routed_expert_name("model.layers.3.mlp.shared_expert.gate_proj.weight"));
  CHECK_FALSE(model::is_routed_expert_name("model.layers.3.mlp.gate.weight"));
  CHECK_FALSE(model::is_routed_expert_name("model.layers.3.mlp.experts.gate_proj.weight"));
}

TEST_CASE("received rows are regrouped by expert, sources in rank order", "[expert_parallel]") {
  // 3 source ranks, 2 local experts: counts[s][l].
  const auto counts = torch::tensor({2, 1, 0, 3, 1, 0}, torch::kLong);
  const auto layout = model::received_layout(counts, 2);
  CHECK(layout.per_expert == std::vector<int64_t>{3, 4});
  CHECK(layout.per_source == std::vector<int64_t>{3, 3, 1});
  // Received: s0e0 s0e0 s0e1 | s1e1 s1e1 s1e1 | s2e0 -> expert 0: s0,s0,s2 (0..2); expert 1: s0,s1,s1,s1 (3..6).
  const auto pos = layout.to_expert_order;
  CHECK(std::vector<int64_t>(pos.data_ptr<int64_t>(), pos.data_ptr<int64_t>() + pos.numel()) ==
        std::vector<int64_t>{0, 1, 3, 4, 5, 6, 2});
}

TEST_CASE("a MoE block split over two ranks computes the whole block's outputs and gradients", "[expert_parallel]") {
  dsopen::testing::check_split_moe_block(torch::kCPU, torch::kFloat32);
  dsopen::testing::check_split_moe_block(torch::kCPU, torch::kBFloat16);  // blocks past 64 rows padded for oneDNN
}

TEST_CASE("optimizer state moves between expert-parallel layouts by parameter name", "[expert_parallel]") {
  // Replicated a, b; experts e0..e3. E=2 writes a replicated file and one expert file per rank; E=1 reads them all,
  // and back.
  auto make = [](const std::vector<std::string>& names) {
    std::vector<std::pair<std::string, torch::Tensor>> out;
    for (size_t i = 0; i < names.size(); ++i) out.push_back({names[i], torch::zeros({3 + static_cast<int64_t>(i), 4}).requires_grad_()});
    return out;
  };
  const std::vector<std::string> all = {"a.weight", "m.experts.0.w", "m.experts.1.w", "m.experts.2.w", "m.experts.3.w", "b.weight"};
  auto fill = [](train::FlatAdamW& opt) {  // moment value = a function of the parameter's name and index
    auto state = opt.state_dict();
    for (auto& g : opt.groups()) {
      int64_t off = 0;
      for (size_t i = 0; i < g.names.size(); ++i) {
        const double tag = static_cast<double>(std::hash<std::string>{}(g.names[i]) % 1000);
        state.at(g.name + ".exp_avg").narrow(0, off, g.numels[i]).copy_(torch::arange(g.numels[i]) + tag);
        state.at(g.name + ".exp_avg_sq").narrow(0, off, g.numels[i]).fill_(tag);
        off += g.numels[i];
      }
    }
  };
  auto check = [](const train::FlatAdamW& opt) {
    const auto state = opt.state_dict();
    for (const auto& g : opt.groups()) {
      int64_t off = 0;
      for (size_t i = 0; i < g.names.size(); ++i) {
        const double tag = static_cast<double>(std::hash<std::string>{}(g.names[i]) % 1000);
        CHECK(torch::equal(state.at(g.name + ".exp_avg").narrow(0, off, g.numels[i]), torch::arange(g.numels[i]).to(torch::kFloat) + tag));
        off += g.numels[i];
      }
    }
  };
  auto whole_params = make(all);
  train::FlatAdamW whole(whole_params, {});
  fill(whole);
  const std::vector<train::FlatAdamW::SavedShard> one{{"rank_0", whole.state_dict(), whole.state_metadata()}};
  // E=2: the replicated part and rank r's experts {2r, 2r+1}.
  std::vector<train::FlatAdamW::SavedShard> two;
  auto dense_params = make(all);
  std::vector<std::pair<std::string, torch::Tensor>> dense{dense_params[0], dense_params[5]};
  train::FlatAdamW dense_opt(dense, {});
  dense_opt.load_state_dicts(one, model::is_routed_expert_name);
  check(dense_opt);
  two.push_back({"rank_0", dense_opt.state_dict(), dense_opt.state_metadata()});
  for (int r = 0; r < 2; ++r) {
    auto p = make(all);
    std::vector<std::pair<std::string, torch::Tensor>> mine{p[1 + 2 * r], p[2 + 2 * r]};
    train::FlatAdamW experts(mine, {});
    experts.load_state_dicts(one, [](const std::string&) { return true; });
    check(experts);
    two.push_back({"experts_rank_" + std::to_string(r), experts.state_dict(), experts.state_metadata()});
  }
  // Back to one rank holding everything: every value found, nothing foreign.
  auto back_params = make(all);
  train::FlatAdamW back(back_params, {});
  back.load_state_dicts(two);
  check(back);
  SECTION("a missing expert file is named") {
    auto partial = two;
    partial.pop_back();
    auto p = make(all);
    train::FlatAdamW opt(p, {});
    CHECK_THAT(error_of([&] { opt.load_state_dicts(partial); }),
               Catch::Contains("no optimizer file holds the state of m.experts.") &&
                   Catch::Contains("read: rank_0, experts_rank_0"));
  }
  SECTION("a file of another step is named") {
    auto mixed = two;
    mixed.back().tensors["step"] = torch::tensor({7}, torch::kLong);
    auto p = make(all);
    train::FlatAdamW opt(p, {});
    CHECK_THAT(error_of([&] { opt.load_state_dicts(mixed); }),
               Catch::Contains("experts_rank_1: holds the optimizer state of step 7"));
  }
  SECTION("a replicated parameter another run did not have is not taken for a foreign expert") {
    auto p = make({"a.weight", "b.weight", "c.weight"});
    train::FlatAdamW opt(p, {});
    CHECK_THAT(error_of([&] { opt.load_state_dicts(two, model::is_routed_expert_name); }),
               Catch::Contains("no optimizer file holds the state of c.weight"));
  }
}

TEST_CASE("memory and all-to-all bytes per rank under expert parallelism", "[expert_parallel]") {
  // 1000 replicated + 800 routed parameters, 8 ranks, E=4: each rank holds 200 experts' parameters, sharded by ZeRO
  // over their 2 replicas.
  auto m = model::training_memory_per_rank(1800, 8, 800, 4);
  CHECK(m.ddp == 16 * 1000 + 16 * 200);
  CHECK(m.zero1 == 8 * 1000 + 8 * 1000 / 8.0 + 8 * 200 + 8 * 200 / 2.0);
  CHECK(m.zero2 == 4 * 1000 + 12 * 1000 / 8.0 + 4 * 200 + 12 * 200 / 2.0);
  CHECK(model::training_memory_per_rank(1800, 8, 800, 1).ddp == 16 * 1800);
  // V3 on EP 64: 58 MoE layers (+ the MTP module's when trained), top-8, hidden 7168, bf16, 4 exchanges, 63/64 of
  // the copies leave the rank.
  auto v3 = *model::find_flavor("v3");
  v3.use_mtp = true;
  CHECK(model::all_to_all_bytes_per_token(v3, 64, 2) == Approx(4.0 * 59 * 8 * 7168 * 2 * 63 / 64));
  v3.use_mtp = false;
  CHECK(model::all_to_all_bytes_per_token(v3, 64, 2) == Approx(4.0 * 58 * 8 * 7168 * 2 * 63 / 64));
  CHECK(model::all_to_all_bytes_per_token(v3, 1, 2) == 0);
}

TEST_CASE("a capacity factor drops each expert's lowest-weight token copies beyond its capacity", "[expert_parallel]") {
  auto c = debug_moe();
  c.aux_loss_alpha = 0;
  torch::manual_seed(3);
  model::MoE moe(c);
  moe->train();
  const int64_t B = 2, T = 20, K = c.num_experts_per_tok, E = c.n_routed_experts;
  auto x = torch::randn({B, T, c.hidden_size});
  auto whole = moe->forward(x);
  CHECK_FALSE(whole.dropped.defined());  // no capacity factor: nothing dropped, nothing counted
  for (double factor : {0.5, 1.0, 100.0}) {
    CAPTURE(factor);
    c.capacity_factor = factor;
    model::MoE capped(c);
    capped->train();
    torch::NoGradGuard no_grad;
    for (auto& p : capped->named_parameters()) p.value().copy_(moe->named_parameters()[p.key()]);
    auto out = capped->forward(x);
    // The slow reference: per expert, its pairs by descending weight, the first `capacity` kept.
    const int64_t capacity = static_cast<int64_t>(std::ceil(factor * B * T * K / E));
    auto flat = x.reshape({B * T, -1});
    auto logits = torch::nn::functional::linear(flat, capped->gate->weight);
    auto r = model::route(logits, capped->gate->e_score_correction_bias, c);
    auto y = capped->shared_experts->forward(flat);
    int64_t dropped = 0;
    for (int64_t e = 0; e < E; ++e) {
      std::vector<std::pair<float, int64_t>> pairs;  // (weight, n * K + k)
      for (int64_t n = 0; n < B * T; ++n)
        for (int64_t k = 0; k < K; ++k)
          if (r.indices[n][k].item<int64_t>() == e) pairs.push_back({r.weights[n][k].item<float>(), n * K + k});
      std::stable_sort(pairs.begin(), pairs.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
      for (size_t i = 0; i < pairs.size(); ++i) {
        if (static_cast<int64_t>(i) >= capacity) {
          ++dropped;
          continue;
        }
        const int64_t n = pairs[i].second / K;
        y[n] += pairs[i].first * capped->expert(e)->forward(flat[n].unsqueeze(0))[0];
      }
    }
    REQUIRE(out.dropped.defined());
    CHECK(out.dropped[0].item<int64_t>() == dropped);
    CHECK(out.dropped[1].item<int64_t>() == B * T * K);
    CHECK(torch::allclose(out.y.reshape({B * T, -1}), y, 1e-5, 1e-5));
    if (factor == 100.0) CHECK(dropped == 0);
    if (factor == 0.5) CHECK(dropped > 0);
    capped->eval();  // evaluation and generation never drop
    CHECK_FALSE(capped->forward(x).dropped.defined());
  }
}
