// Data-parallel building blocks that need no second process: sharded AdamW equals the unsharded update, optimizer
// state saved by N ranks re-slices for any other world size (and bucket size), the offloaded update equals the
// on-device one, ZeRO memory per rank, the rank environment of launchers and Slurm, and ZeRO-3's gathering of
// parameter units (one process trains exactly as no sharding, each unit whole only while it runs). The multi-process
// behaviour (Gloo collectives, the launcher, resume on other world sizes) is tests/dist_test.sh.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <optional>

#include "model/param_units.h"
#include "model/registry.h"
#include "model/transformer.h"
#include "tests/test_helpers.h"
#include "train/data_parallel.h"
#include "train/optimizer.h"
#include "train/process_group.h"
#include "utils/compat.h"

using namespace dsopen;
using dsopen::testing::error_of;

namespace {

// Odd sizes so that buckets need padding for every world size.
std::vector<std::pair<std::string, torch::Tensor>> make_params(uint64_t seed) {
  torch::manual_seed(seed);
  return {{"a.weight", torch::randn({7, 5}).requires_grad_()},
          {"b.weight", torch::randn({3, 11}).requires_grad_()},
          {"c.weight", torch::randn({13, 2}).requires_grad_()},
          {"norm.weight", torch::randn({9}).requires_grad_()}};
}

train::ShardingOptions sharding(int rank, int world, bool zero, int64_t bucket) {
  train::ShardingOptions s;
  s.rank = rank;
  s.world_size = world;
  s.shard_state = zero;
  s.bucket_numel = bucket;
  return s;
}

// Sets every parameter's gradient to a fixed function of the step.
void set_grads(std::vector<std::pair<std::string, torch::Tensor>>& params, int step) {
  torch::NoGradGuard g;
  for (size_t i = 0; i < params.size(); ++i)
    params[i].second.mutable_grad().copy_(torch::sin(torch::arange(params[i].second.numel()).to(torch::kFloat) *
                                                     (0.3 + 0.1 * i) + step).view(params[i].second.sizes()));
}

std::map<std::string, torch::Tensor> values(const std::vector<std::pair<std::string, torch::Tensor>>& params) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& [n, p] : params) out[n] = p.detach().clone();
  return out;
}

}  // namespace

TEST_CASE("ZeRO-sharded AdamW steps the same values as the unsharded one", "[distributed]") {
  auto ref_params = make_params(1);
  train::FlatAdamW ref(ref_params, {});
  const int world = 3;
  std::vector<std::vector<std::pair<std::string, torch::Tensor>>> rank_params;
  std::vector<std::unique_ptr<train::FlatAdamW>> ranks;
  for (int r = 0; r < world; ++r) {
    rank_params.push_back(make_params(1));
    ranks.push_back(std::make_unique<train::FlatAdamW>(rank_params.back(), train::AdamWOptions{}, sharding(r, world, true, 20)));
  }
  for (int step = 0; step < 3; ++step) {
    set_grads(ref_params, step);
    ref.step(1e-2);
    for (int r = 0; r < world; ++r) {
      set_grads(rank_params[r], step);
      ranks[r]->step(1e-2);
    }
    // What the all-gather does: each rank contributes its slices of every bucket.
    for (int r = 0; r < world; ++r)
      for (size_t g = 0; g < ranks[r]->groups().size(); ++g)
        for (const auto& pc : ranks[r]->pieces(ranks[r]->groups()[g]))
          for (int q = 0; q < world; ++q)
            if (q != r) ranks[q]->groups()[g].params.narrow(0, pc.offset, pc.numel).copy_(ranks[r]->groups()[g].params.narrow(0, pc.offset, pc.numel));
  }
  const auto want = values(ref_params);
  for (int r = 0; r < world; ++r)
    for (const auto& [name, v] : values(rank_params[r])) CHECK(torch::allclose(v, want.at(name), 0, 1e-6));
  // Moments exist for this rank's slices only: total/N within the padding (fewer than N values per bucket).
  const int64_t P = ref.num_params();
  for (const auto& r : ranks) {
    CHECK(r->state_bytes() >= 8 * P / world);
    CHECK(r->state_bytes() <= 8 * (P / world + 8));
  }
}

TEST_CASE("optimizer state saved by 4 ranks re-slices onto 2 ranks, 1 rank and other bucket sizes", "[distributed]") {
  // Four ranks with moments m = unpadded index + 0.5, v = 2 * index.
  std::vector<train::FlatAdamW::SavedShard> saved;
  for (int r = 0; r < 4; ++r) {
    auto params = make_params(2);
    train::FlatAdamW opt(params, {}, sharding(r, 4, true, 16));
    const auto state = opt.state_dict();  // the moments themselves (the optimizer keeps them private)
    for (auto& g : opt.groups())
      for (const auto& range : opt.owned_ranges(g)) {
        auto idx = torch::arange(range.unpadded_offset, range.unpadded_offset + range.numel).to(torch::kFloat);
        state.at(g.name + ".exp_avg").narrow(0, range.state_offset, range.numel).copy_(idx + 0.5);
        state.at(g.name + ".exp_avg_sq").narrow(0, range.state_offset, range.numel).copy_(idx * 2);
      }
    saved.push_back({"rank_" + std::to_string(r), opt.state_dict(), opt.state_metadata()});
  }
  auto check_loaded = [&](const train::FlatAdamW& opt) {
    const auto state = opt.state_dict();
    for (const auto& g : opt.groups())
      for (const auto& range : opt.owned_ranges(g)) {
        auto idx = torch::arange(range.unpadded_offset, range.unpadded_offset + range.numel).to(torch::kFloat);
        CHECK(torch::equal(state.at(g.name + ".exp_avg").narrow(0, range.state_offset, range.numel), idx + 0.5));
        CHECK(torch::equal(state.at(g.name + ".exp_avg_sq").narrow(0, range.state_offset, range.numel), idx * 2));
      }
  };
  for (int r = 0; r < 2; ++r) {
    auto params = make_params(2);
    train::FlatAdamW opt(params, {}, sharding(r, 2, true, 40));
    opt.load_state_dicts(saved);
    check_loaded(opt);
  }
  auto params = make_params(2);
  train::FlatAdamW whole(params, {});
  whole.load_state_dicts(saved);
  check_loaded(whole);

  // And back: the unsharded state onto 4 ranks.
  std::vector<train::FlatAdamW::SavedShard> one{{"rank_0", whole.state_dict(), whole.state_metadata()}};
  auto params4 = make_params(2);
  train::FlatAdamW opt4(params4, {}, sharding(3, 4, true, 16));
  opt4.load_state_dicts(one);
  check_loaded(opt4);

  SECTION("a missing rank file is named as a coverage gap") {
    auto partial = saved;
    partial.erase(partial.begin() + 1);
    auto p = make_params(2);
    train::FlatAdamW opt(p, {});
    CHECK_THAT(error_of([&] { opt.load_state_dicts(partial); }),
               Catch::Contains("cover only 69 of the 94 decay values this rank needs (written by a run of 4 ranks)"));
  }
  SECTION("another parameter set is named") {
    auto p = make_params(2);
    p[1].first = "renamed.weight";
    train::FlatAdamW opt(p, {});
    CHECK_THAT(error_of([&] { opt.load_state_dicts(saved); }),
               Catch::Contains("rank_0: optimizer state was written for another set of trainable parameters"));
  }
}

TEST_CASE("the offloaded optimizer step equals the on-device one", "[distributed]") {
  for (bool zero : {false, true}) {
    auto a = make_params(3), b = make_params(3);
    auto layout = zero ? sharding(1, 2, true, 10) : sharding(0, 1, false, 0);
    train::FlatAdamW on_device(a, {}, layout);
    layout.offload = true;
    train::FlatAdamW offloaded(b, {}, layout);
    CHECK(offloaded.groups()[0].master.defined());
    for (int step = 0; step < 4; ++step) {
      set_grads(a, step);
      set_grads(b, step);
      on_device.step(3e-2);
      offloaded.step(3e-2);
    }
    // The values this rank owns match, and the host master copy holds them too.
    for (size_t g = 0; g < offloaded.groups().size(); ++g)
      for (const auto& pc : offloaded.pieces(offloaded.groups()[g])) {
        auto got = offloaded.groups()[g].params.narrow(0, pc.offset, pc.numel);
        CHECK(torch::allclose(got, on_device.groups()[g].params.narrow(0, pc.offset, pc.numel), 0, 1e-7));
        CHECK(torch::equal(got, offloaded.groups()[g].master.narrow(0, pc.state_offset, pc.numel)));
      }
  }
}

TEST_CASE("the rank environment comes from the launcher or from Slurm", "[distributed]") {
  auto clear = [] {
    for (const char* v : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                          "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NODELIST"})
      ::unsetenv(v);
  };
  clear();
  auto e = train::read_dist_env();
  CHECK(e.world_size == 1);
  CHECK(e.source == "single process");

  ::setenv("RANK", "5", 1);
  ::setenv("WORLD_SIZE", "8", 1);
  ::setenv("LOCAL_RANK", "1", 1);
  ::setenv("LOCAL_WORLD_SIZE", "4", 1);
  ::setenv("MASTER_ADDR", "10.0.0.1", 1);
  ::setenv("MASTER_PORT", "1234", 1);
  e = train::read_dist_env();
  CHECK((e.rank == 5 && e.world_size == 8 && e.local_rank == 1 && e.local_world_size == 4));
  CHECK((e.master_addr == "10.0.0.1" && e.master_port == 1234 && e.source == "launcher"));

  ::setenv("RANK", "8", 1);
  CHECK_THAT(error_of([] { train::read_dist_env(); }), Catch::Contains("RANK: 8 is not below WORLD_SIZE 8"));
  ::setenv("RANK", "one", 1);
  CHECK_THAT(error_of([] { train::read_dist_env(); }), Catch::Contains("environment variable RANK: 'one' is not a valid number"));

  clear();
  ::setenv("SLURM_PROCID", "3", 1);
  ::setenv("SLURM_NTASKS", "16", 1);
  ::setenv("SLURM_LOCALID", "3", 1);
  ::setenv("SLURM_NTASKS_PER_NODE", "8(x2)", 1);
  ::setenv("SLURM_JOB_NODELIST", "gpu[07-08],gpu11", 1);
  e = train::read_dist_env();
  CHECK((e.rank == 3 && e.world_size == 16 && e.local_rank == 3 && e.local_world_size == 8));
  CHECK((e.master_addr == "gpu07" && e.source == "slurm"));
  clear();
}

TEST_CASE("the gradient norm is exact to 1e-8 whatever the buffer's size and slicing", "[distributed]") {
  // A float32 reduction over millions of values is off by ~1e-4 relative here, and by another amount per slice
  // layout: ranks holding ZeRO-2 slices would clip differently from one rank holding everything.
  torch::manual_seed(21);
  auto make = [] {
    return std::vector<std::pair<std::string, torch::Tensor>>{{"big.weight", torch::zeros({2048, 2047}).requires_grad_()},
                                                              {"bias", torch::zeros({777}).requires_grad_()}};
  };
  std::vector<torch::Tensor> grads = {torch::randn({2048, 2047}) * torch::rand({2048, 2047}) * 1e-2,
                                      torch::randn({777}) * 1e-2};
  double exact = 0;
  for (const auto& g : grads) exact += g.to(torch::kFloat64).pow(2).sum().item<double>();
  auto set_grads = [&](std::vector<std::pair<std::string, torch::Tensor>>& params) {
    torch::NoGradGuard g;
    for (size_t i = 0; i < params.size(); ++i) params[i].second.mutable_grad().copy_(grads[i]);
  };
  auto whole = make();
  train::FlatAdamW opt(whole, {});
  set_grads(whole);
  CHECK(opt.grad_norm() == Approx(std::sqrt(exact)).epsilon(1e-8));
  // Three ZeRO-2 ranks, each holding its slices of the same gradients: the squared norms add up to the same total.
  double sliced = 0;
  for (int r = 0; r < 3; ++r) {
    auto full_params = make();
    train::FlatAdamW full(full_params, {}, sharding(r, 3, true, 1 << 20));  // the 3-rank layout, whole gradients
    set_grads(full_params);
    auto params = make();
    auto sh = sharding(r, 3, true, 1 << 20);
    sh.whole_grads = false;
    train::FlatAdamW rank(params, {}, sh);
    for (size_t gi = 0; gi < rank.groups().size(); ++gi)
      for (const auto& pc : rank.pieces(rank.groups()[gi]))
        rank.groups()[gi].shard_grads.narrow(0, pc.state_offset, pc.numel)
            .copy_(full.groups()[gi].grads.narrow(0, pc.offset, pc.numel));
    sliced += rank.grad_norm() * rank.grad_norm();
  }
  CHECK(std::sqrt(sliced) == Approx(std::sqrt(exact)).epsilon(1e-8));
}

namespace {

std::vector<std::pair<std::string, torch::Tensor>> named(model::CausalLM& m) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (auto& p : m->named_parameters()) out.push_back({p.key(), p.value()});
  return out;
}

bool every_parameter_freed(model::CausalLM& m) {
  for (const auto& p : m->parameters())
    if (p.storage().nbytes() != 0) return false;
  return true;
}

}  // namespace

TEST_CASE("ZeRO-3 in one process trains exactly as no sharding, holding each unit only while it runs",
          "[distributed][zero3]") {
  auto c = *model::find_flavor("debug");  // MoE, MLA and an MTP module: every kind of unit
  c.aux_loss_alpha = 0.01;
  struct Case {
    bool checkpointing, offload, bf16;
  };
  for (const Case cs : {Case{false, false, false}, Case{true, true, false}, Case{true, false, true}, Case{false, false, true}}) {
    const bool checkpointing = cs.checkpointing;
    DYNAMIC_SECTION("checkpointing " << cs.checkpointing << ", offload " << cs.offload << ", bf16 autocast " << cs.bf16) {
      torch::manual_seed(7);
      model::CausalLM ref(c);
      torch::manual_seed(7);
      model::CausalLM sharded(c);
      auto group = train::create_process_group(train::DistEnv{}, torch::kCPU, {});
      train::DataParallel plain(named(ref), {}, {}, group);
      train::DataParallelOptions o;
      o.strategy = train::Strategy::Zero3;
      o.offload_optimizer = cs.offload;  // the offloaded step updates the slices alike
      o.units.unit_of = [c](const std::string& name) { return model::unit_of(name, c); };
      o.units.units = model::unit_count(c);
      o.units.layers = c.num_hidden_layers;
      // Under bf16 autocast the projections travel in bf16: exactly what autocast casts the fp32 weights to.
      o.units.compute_dtype = cs.bf16 ? torch::kBFloat16 : torch::kFloat32;
      const auto projections = model::projection_weight_names(*sharded);
      o.units.low_precision = [&](const std::string& name) { return projections.count(name) > 0; };
      train::DataParallel zero3(named(sharded), {}, o, group);
      sharded->set_unit_hooks(zero3.sharded_units());
      for (auto* m : {&ref, &sharded}) {
        (*m)->set_activation_checkpointing(checkpointing);
        (*m)->train();
      }
      CHECK(every_parameter_freed(sharded));
      torch::manual_seed(1);
      const auto ids = torch::randint(0, c.vocab_size, {4, 16});
      for (int step = 0; step < 3; ++step) {
        double losses[2] = {0, 0};
        train::DataParallel* dps[2] = {&plain, &zero3};
        model::CausalLM* models[2] = {&ref, &sharded};
        for (int k = 0; k < 2; ++k) {
          dps[k]->zero_grad();
          for (int micro = 0; micro < 2; ++micro) {  // gradient accumulation: reduced per micro-step under zero3
            dps[k]->begin_micro_step(micro == 1);
            const auto rows = ids.narrow(0, 2 * micro, 2);
            std::optional<compat::AutocastScope> autocast;
            if (cs.bf16) autocast.emplace(c10::DeviceType::CPU, true, torch::kBFloat16);
            auto out = (*models[k])->forward(rows, rows);
            out.loss.backward();
            dps[k]->end_micro_step();
            losses[k] += out.loss.item<double>();
          }
          CHECK(dps[k]->grad_norm() > 0);
          dps[k]->step(1e-2);
        }
        CHECK(losses[0] == losses[1]);
        CHECK(every_parameter_freed(sharded));
      }
      // At most two units whole at once (the one running and the one being prefetched).
      {
        auto* units = zero3.sharded_units();
        CHECK(units->peak_gathered_bytes() <= 2 * units->largest_unit_bytes());
        CHECK(units->peak_gathered_bytes() >= units->largest_unit_bytes());
        CHECK(zero3.param_bytes() == plain.param_bytes());  // one rank: its slices are everything
        if (!cs.bf16) CHECK(units->largest_unit_bytes() == 4 * model::count_parameters(c).largest_unit);  // the planner's
      }
      // The final weights, gathered unit by unit, equal the unsharded run's.
      std::map<std::string, torch::Tensor> want;
      for (auto& p : ref->named_parameters()) want[p.key()] = p.value().detach();
      size_t seen = 0;
      for (int64_t u = 0; u < zero3.sharded_units()->units(); ++u)
        for (const auto& [name, t] : zero3.sharded_units()->gather_values(u)) {
          CHECK(torch::equal(t, want.at(name)));
          ++seen;
        }
      CHECK(seen == want.size());
      // Evaluation (no grad) gathers and frees the same way.
      {
        torch::NoGradGuard no_grad;
        std::optional<compat::AutocastScope> autocast;  // as the trainer evaluates: in the training precision
        if (cs.bf16) autocast.emplace(c10::DeviceType::CPU, true, torch::kBFloat16);
        auto a = ref->forward(ids, ids).loss, b = sharded->forward(ids, ids).loss;
        CHECK(a.item<double>() == b.item<double>());
      }
      CHECK(every_parameter_freed(sharded));
      sharded->set_unit_hooks(nullptr);
    }
  }
}

TEST_CASE("parameter units follow the model's modules", "[distributed][zero3]") {
  auto c = *model::find_flavor("debug");
  const int64_t L = c.num_hidden_layers;
  CHECK(model::unit_count(c) == L + 3 + c.mtp_depth());
  CHECK(model::unit_of("model.embed_tokens.weight", c) == 0);
  CHECK(model::unit_of("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", c) == 1);
  CHECK(model::unit_of("model.layers." + std::to_string(L - 1) + ".mlp.experts.3.up_proj.weight", c) == L);
  CHECK(model::unit_of("model.norm.weight", c) == L + 1);
  CHECK(model::unit_of("lm_head.weight", c) == L + 2);
  CHECK(model::unit_of("mtp.0.eh_proj.weight", c) == L + 3);
  CHECK(model::unit_of("model.layers." + std::to_string(L) + ".mlp.gate.weight", c) == -1);  // no such layer
  CHECK(model::unit_of("something.else", c) == -1);
  // Every parameter of the model belongs to a unit.
  model::CausalLM m(c);
  for (const auto& p : m->named_parameters()) CHECK(model::unit_of(p.key(), c) >= 0);
}
