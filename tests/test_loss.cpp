// The training objective (model/loss.h) and MoE statistics: every MoE block, MTP included, reports its load and
// balances; positions without a target change no statistic or loss term; every token-level term is normalised by
// the global count of its own targets, so splitting a batch into micro-batches changes neither loss nor gradients.
#include <catch2/catch.hpp>

#include "model/loss.h"
#include "model/moe_balance.h"
#include "model/registry.h"
#include "model/transformer.h"

using namespace dsopen::model;

namespace {

// The debug flavor (V3-style: MLA, sigmoid MoE with correction bias, one MTP module) with every term on.
ModelConfig all_terms() {
  ModelConfig c = *find_flavor("debug");
  c.use_mtp = true;
  c.aux_loss_alpha = 0.01;
  c.z_loss_coef = 1e-3;
  c.bias_update_speed = 0.01;
  return c;
}

CausalLM make(const ModelConfig& c, uint64_t seed) {
  torch::manual_seed(seed);
  CausalLM m(c);
  m->train();
  return m;
}

// Rows with different numbers of targets, so that averaging per micro-batch would weigh them differently.
std::pair<torch::Tensor, torch::Tensor> ragged_batch(int64_t B, int64_t T, uint64_t seed) {
  torch::manual_seed(seed);
  auto ids = torch::randint(3, 256, {B, T}, torch::kLong);
  auto labels = torch::cat({ids.narrow(1, 1, T - 1), torch::full({B, 1}, -100, torch::kLong)}, 1);
  for (int64_t b = 0; b < B; ++b) labels[b].narrow(0, 0, b * 3).fill_(-100);  // row b: its first 3b positions masked
  return {ids, labels};
}

std::map<std::string, torch::Tensor> grads_of(CausalLM& m) {
  std::map<std::string, torch::Tensor> g;
  for (auto& p : m->named_parameters())
    if (p.value().grad().defined()) g[p.key()] = p.value().grad().clone();
  return g;
}

}  // namespace

TEST_CASE("every MoE block, the MTP module's included, reports its load and balances", "[model][moe][loss]") {
  const ModelConfig c = all_terms();
  CausalLM m = make(c, 1);
  const auto blocks = m->moe_blocks();
  REQUIRE(blocks.size() == 2);
  CHECK(blocks[0].name == "model.layers.1.mlp");  // first_k_dense_replace = 1
  CHECK(blocks[1].name == "model.layers.2.mlp");  // MTP module 0 sits after the 2 decoder layers
  auto [ids, labels] = ragged_batch(2, 16, 3);
  auto out = m->forward(ids, labels);
  REQUIRE(out.expert_load.size() == blocks.size());
  // Each block routes K experts for every position with a target.
  const int64_t K = c.num_experts_per_tok;
  CHECK(out.expert_load[0].sum().item<int64_t>() == out.counts.targets * K);
  CHECK(out.expert_load[1].sum().item<int64_t>() == out.counts.mtp_targets.at(0) * K);
  CHECK(out.sums.mtp_aux.at(0).item<double>() > 0);

  MoEBalancer balancer(*m);
  balancer.add(out.expert_load);
  balancer.update_biases(c.bias_update_speed);
  for (const auto& b : blocks) {
    INFO(b.name);
    auto bias = b.moe->gate->e_score_correction_bias;
    CHECK(bias.abs().max().item<double>() == Approx(0.01));
    // Every entry moved by a whole step (or stayed, at the mean).
    CHECK(((bias / 0.01).round() * 0.01 - bias).abs().max().item<double>() < 1e-7);
  }
  CHECK(balancer.imbalance_per_block().size() == 2);
}

TEST_CASE("positions without a target change no MoE statistic and no loss term", "[model][moe][loss]") {
  for (bool checkpointing : {false, true}) {
    INFO("activation checkpointing " << checkpointing);
    const ModelConfig c = all_terms();
    auto [ids, labels] = ragged_batch(3, 12, 5);
    // The same rows with 9 trailing padding positions (pad id, no target).
    auto padded_ids = torch::cat({ids, torch::full({3, 9}, c.pad_token_id, torch::kLong)}, 1);
    auto padded_labels = torch::cat({labels, torch::full({3, 9}, -100, torch::kLong)}, 1);
    std::vector<ForwardOutput> outs;
    for (auto [i, l] : {std::make_pair(ids, labels), std::make_pair(padded_ids, padded_labels)}) {
      CausalLM m = make(c, 2);
      m->set_activation_checkpointing(checkpointing);
      outs.push_back(m->forward(i, l));
    }
    const auto& a = outs[0];
    const auto& b = outs[1];
    REQUIRE(a.expert_load.size() == b.expert_load.size());
    for (size_t i = 0; i < a.expert_load.size(); ++i) CHECK(torch::equal(a.expert_load[i], b.expert_load[i]));
    CHECK(a.counts.to_vector() == b.counts.to_vector());
    CHECK(a.sums.aux.item<double>() == Approx(b.sums.aux.item<double>()).epsilon(1e-6));
    CHECK(a.sums.mtp_aux.at(0).item<double>() == Approx(b.sums.mtp_aux.at(0).item<double>()).epsilon(1e-6));
    CHECK(a.sums.z.item<double>() == Approx(b.sums.z.item<double>()).epsilon(1e-6));
    CHECK(a.sums.mtp_ce.at(0).item<double>() == Approx(b.sums.mtp_ce.at(0).item<double>()).epsilon(1e-6));
    CHECK(a.loss.item<double>() == Approx(b.loss.item<double>()).epsilon(1e-6));
  }
}

TEST_CASE("loss terms are normalised by global target counts: any micro-batch split gives the same step",
          "[model][loss]") {
  const ModelConfig c = all_terms();
  auto [ids, labels] = ragged_batch(4, 16, 7);
  const LossCounts global = count_loss_targets(c, labels, {});
  REQUIRE(global.mtp_targets.at(0) < global.targets);  // MTP has fewer targets than the main head
  std::vector<std::pair<double, std::map<std::string, torch::Tensor>>> runs;
  for (int64_t micro : {4, 2, 1}) {
    CausalLM m = make(c, 4);
    double total = 0;
    LossCounts seen;
    for (int64_t start = 0; start < 4; start += micro) {
      auto out = m->forward(ids.narrow(0, start, micro), labels.narrow(0, start, micro));
      seen += out.counts;
      const Loss l = compose_loss(out.sums, global, c);
      l.total.backward();
      total += l.total.item<double>();
    }
    CHECK(seen.to_vector() == global.to_vector());
    runs.push_back({total, grads_of(m)});
  }
  for (size_t r = 1; r < runs.size(); ++r) {
    CHECK(runs[r].first == Approx(runs[0].first).epsilon(1e-6));
    for (auto& [name, g] : runs[0].second) {
      INFO(name << " split " << r);
      CHECK((g - runs[r].second.at(name)).abs().max().item<double>() < 1e-6);
    }
  }
  // And the composed loss of the whole batch is that of one forward over it.
  CausalLM m = make(c, 4);
  CHECK(m->forward(ids, labels).loss.item<double>() == Approx(runs[0].first).epsilon(1e-6));
}

TEST_CASE("MTP targets stay inside their packed document; counts follow them", "[model][loss]") {
  ModelConfig c = all_terms();
  auto labels = torch::tensor({{5, 6, 7, 8, 9, -100}}, torch::kLong);
  auto segments = torch::tensor({{1, 1, 1, 2, 2, 2}}, torch::kLong);
  auto t1 = mtp_targets(labels, segments, 1);  // position i predicts labels[i + 1] when i + 1 is in i's document
  CHECK(torch::equal(t1, torch::tensor({{6, 7, -100, 9, -100}}, torch::kLong)));
  const LossCounts n = count_loss_targets(c, labels, segments);
  CHECK(n.targets == 5);
  CHECK(n.mtp_targets == std::vector<double>{3});
  CHECK(n.units == 1);
  c.seq_aux = false;
  CHECK(count_loss_targets(c, labels, segments).units == 1);
}
