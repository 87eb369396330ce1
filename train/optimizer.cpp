#include "train/optimizer.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "utils/errors.h"
#include "utils/json.h"

namespace dsopen::train {

FlatAdamW::FlatAdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, const AdamWOptions& o,
                     const ShardingOptions& sh)
    : opts_(o), sharding_(sh) {
  const int64_t N = sh.world_size;
  if (N < 1 || sh.rank < 0 || sh.rank >= N) throw std::invalid_argument("FlatAdamW: bad rank/world size");
  if (!sh.whole_grads && !sh.shard_state) throw std::invalid_argument("FlatAdamW: sharded gradients need sharded state");
  std::vector<std::pair<std::string, torch::Tensor>> members[2];  // [no decay, decay]
  for (const auto& [name, p] : named_params) {
    if (!p.requires_grad()) continue;
    const bool embedding = name.find("embed_tokens") != std::string::npos;
    const bool decay = p.dim() >= 2 && (!embedding || o.decay_embeddings);
    members[decay].push_back({name, p});
  }
  torch::NoGradGuard no_grad;
  for (int d = 1; d >= 0; --d) {
    if (members[d].empty()) continue;
    std::reverse(members[d].begin(), members[d].end());  // backward produces the last layers' gradients first
    Group g;
    g.name = d ? "decay" : "no_decay";
    g.decay = d == 1;
    // Buckets at parameter boundaries, each padded to a multiple of the world size.
    int64_t padded = 0, unpadded = 0;
    for (size_t i = 0; i < members[d].size(); ++i) {
      if (g.buckets.empty() || (sh.bucket_numel > 0 && g.buckets.back().unpadded_numel >= sh.bucket_numel)) {
        Bucket b;
        b.offset = padded;
        b.unpadded_offset = unpadded;
        g.buckets.push_back(b);
      }
      Bucket& b = g.buckets.back();
      const int64_t n = members[d][i].second.numel();
      g.offsets.push_back(b.offset + b.unpadded_numel);
      g.numels.push_back(n);
      g.names.push_back(members[d][i].first);
      g.tensors.push_back(members[d][i].second);
      b.params.push_back(i);
      b.unpadded_numel += n;
      unpadded += n;
      b.numel = (b.unpadded_numel + N - 1) / N * N;
      padded = b.offset + b.numel;
    }
    g.numel = unpadded;
    int64_t shard_offset = 0;
    for (auto& b : g.buckets) {
      b.shard_offset = shard_offset;
      shard_offset += b.numel / N;
    }
    const auto opts = members[d].front().second.options().dtype(torch::kFloat32);
    g.params = torch::zeros({padded}, opts);
    for (size_t i = 0; i < g.tensors.size(); ++i) {
      auto& p = g.tensors[i];
      auto slot = g.params.narrow(0, g.offsets[i], g.numels[i]);
      slot.copy_(p.detach().reshape({-1}));
      p.set_data(slot.view(p.sizes()));  // the parameter now lives in the buffer
    }
    if (sh.whole_grads) {
      g.grads = torch::zeros({padded}, opts);
      for (size_t i = 0; i < g.tensors.size(); ++i)  // backward accumulates in place here
        g.tensors[i].mutable_grad() = g.grads.narrow(0, g.offsets[i], g.numels[i]).view(g.tensors[i].sizes());
    } else {
      g.shard_grads = torch::zeros({padded / N}, opts);
    }
    const int64_t state_numel = sh.shard_state ? padded / N : padded;
    auto state_opts = opts;
    if (sh.offload) {
      state_opts = torch::TensorOptions().dtype(torch::kFloat32).device(torch::kCPU);
      if (opts.device().is_cuda()) state_opts = state_opts.pinned_memory(true);  // async-capable copies
    }
    g.m = torch::zeros({state_numel}, state_opts);
    g.v = torch::zeros({state_numel}, state_opts);
    groups_.push_back(std::move(g));
    if (sh.offload) {
      Group& gg = groups_.back();
      gg.master = torch::zeros({state_numel}, state_opts);
      for (const auto& pc : pieces(gg)) gg.master.narrow(0, pc.state_offset, pc.numel).copy_(gg.params.narrow(0, pc.offset, pc.numel));
    }
  }
}

std::vector<FlatAdamW::Piece> FlatAdamW::pieces(const Group& g) const {
  if (!sharding_.shard_state) return {{0, g.params.numel(), 0, nullptr}};
  std::vector<Piece> out;
  for (const auto& b : g.buckets) {
    const int64_t slice = b.numel / sharding_.world_size;
    out.push_back({b.offset + sharding_.rank * slice, slice, b.shard_offset, &b});
  }
  return out;
}

std::vector<FlatAdamW::Range> FlatAdamW::owned_ranges(const Group& g) const {
  std::vector<Range> out;
  for (const auto& b : g.buckets) {
    int64_t start = b.offset, len = b.numel, state_offset = b.offset;
    if (sharding_.shard_state) {
      len = b.numel / sharding_.world_size;
      start = b.offset + sharding_.rank * len;
      state_offset = b.shard_offset;
    }
    const int64_t n = std::min(start + len, b.offset + b.unpadded_numel) - start;
    if (n > 0) out.push_back({state_offset, b.unpadded_offset + (start - b.offset), n});
  }
  return out;
}

void FlatAdamW::zero_grad() {
  for (auto& g : groups_) (sharding_.whole_grads ? g.grads : g.shard_grads).zero_();
}

double FlatAdamW::grad_norm() const {
  // Accumulated in float64: a float32 reduction over millions of values is off by ~1e-6 relative, and by a
  // different amount for every partition of the buffer, so ranks holding slices (ZeRO-2) and one rank holding
  // everything would clip differently.
  double sq = 0;
  for (const auto& g : groups_) {
    const double n = torch::linalg_vector_norm(sharding_.whole_grads ? g.grads : g.shard_grads, 2, c10::nullopt,
                                               false, torch::kFloat64)
                         .item<double>();
    sq += n * n;
  }
  return std::sqrt(sq);
}

void FlatAdamW::scale_grads(double factor) {
  for (auto& g : groups_) (sharding_.whole_grads ? g.grads : g.shard_grads).mul_(factor);
}

void FlatAdamW::step(double lr) {
  torch::NoGradGuard no_grad;
  ++step_;
  const double bc1 = 1.0 - std::pow(opts_.beta1, static_cast<double>(step_));
  const double bc2 = 1.0 - std::pow(opts_.beta2, static_cast<double>(step_));
  for (auto& g : groups_) {
    for (const auto& pc : pieces(g)) {
      auto grad = sharding_.whole_grads ? g.grads.narrow(0, pc.offset, pc.numel)
                                        : g.shard_grads.narrow(0, pc.state_offset, pc.numel);
      auto m = g.m.narrow(0, pc.state_offset, pc.numel), v = g.v.narrow(0, pc.state_offset, pc.numel);
      auto param = g.params.narrow(0, pc.offset, pc.numel);
      // Offload: the update runs on the host copy (multithreaded CPU kernels), then the result goes back.
      auto target = sharding_.offload ? g.master.narrow(0, pc.state_offset, pc.numel) : param;
      if (sharding_.offload) grad = grad.to(torch::kCPU);
      if (g.decay && opts_.weight_decay > 0) target.mul_(1.0 - lr * opts_.weight_decay);  // decoupled decay
      m.lerp_(grad, 1.0 - opts_.beta1);                                                // m = b1 m + (1-b1) g
      v.mul_(opts_.beta2).addcmul_(grad, grad, 1.0 - opts_.beta2);                     // v = b2 v + (1-b2) g^2
      auto denom = (v / bc2).sqrt_().add_(opts_.eps);
      target.addcdiv_(m, denom, -lr / bc1);
      if (sharding_.offload) param.copy_(target, /*non_blocking=*/false);
    }
  }
}

int64_t FlatAdamW::num_params() const {
  int64_t n = 0;
  for (const auto& g : groups_) n += g.numel;
  return n;
}

int64_t FlatAdamW::state_bytes() const {
  int64_t n = 0;
  for (const auto& g : groups_) n += g.m.numel() + g.v.numel() + (g.master.defined() ? g.master.numel() : 0);
  return n * 4;
}

int64_t FlatAdamW::grad_bytes() const {
  int64_t n = 0;
  for (const auto& g : groups_) n += (sharding_.whole_grads ? g.grads : g.shard_grads).numel();
  return n * 4;
}

std::map<std::string, torch::Tensor> FlatAdamW::state_dict() const {
  std::map<std::string, torch::Tensor> s;
  for (const auto& g : groups_) {
    s[g.name + ".exp_avg"] = g.m;
    s[g.name + ".exp_avg_sq"] = g.v;
    const auto ranges = owned_ranges(g);
    auto r = torch::empty({static_cast<int64_t>(ranges.size()), 3}, torch::kInt64);
    for (size_t i = 0; i < ranges.size(); ++i) {
      r[i][0] = ranges[i].state_offset;
      r[i][1] = ranges[i].unpadded_offset;
      r[i][2] = ranges[i].numel;
    }
    s[g.name + ".ranges"] = r;
  }
  s["step"] = torch::tensor({step_}, torch::kInt64);
  return s;
}

std::map<std::string, std::string> FlatAdamW::state_metadata() const {
  nlohmann::json groups = nlohmann::json::array();
  for (const auto& g : groups_) {
    nlohmann::json params = nlohmann::json::array();
    for (size_t i = 0; i < g.names.size(); ++i) params.push_back({g.names[i], g.numels[i]});
    groups.push_back({{"name", g.name}, {"numel", g.numel}, {"params", params}});
  }
  return {{"dsopen.optimizer_layout", groups.dump()},
          {"dsopen.world_size", std::to_string(sharding_.world_size)},
          {"dsopen.rank", std::to_string(sharding_.rank)}};
}

void FlatAdamW::load_state_dicts(const std::vector<SavedShard>& shards) {
  if (shards.empty()) throw runtime_error("optimizer", "no optimizer state files", "is this a complete checkpoint?");
  const nlohmann::json mine = nlohmann::json::parse(state_metadata().at("dsopen.optimizer_layout"));
  for (const auto& sh : shards) {
    auto it = sh.metadata.find("dsopen.optimizer_layout");
    if (it == sh.metadata.end())
      throw runtime_error(sh.source, "has no optimizer layout metadata", "the file is not a dsopen optimizer shard");
    nlohmann::json theirs;
    try {
      theirs = json::parse(it->second, sh.source);
    } catch (const std::exception&) {
      throw runtime_error(sh.source, "optimizer layout metadata is not valid JSON", "restore the file");
    }
    if (theirs != mine) {
      // Name the first parameter that differs: the usual cause is another model or another LoRA/freeze setup.
      std::string what = "the parameter groups differ";
      for (size_t gi = 0; gi < std::min(theirs.size(), mine.size()); ++gi) {
        const auto &a = theirs[gi]["params"], &b = mine[gi]["params"];
        for (size_t i = 0; i < std::max(a.size(), b.size()); ++i)
          if (i >= a.size() || i >= b.size() || a[i] != b[i]) {
            what = "first difference at " + (i < b.size() ? b[i][0].get<std::string>() : a[i][0].get<std::string>());
            break;
          }
      }
      throw runtime_error(sh.source, "optimizer state was written for another set of trainable parameters (" + what + ")",
                          "resume with the model and trainable parameters that wrote it");
    }
  }
  auto get = [](const SavedShard& sh, const std::string& key) -> const torch::Tensor& {
    auto it = sh.tensors.find(key);
    if (it == sh.tensors.end()) throw runtime_error(sh.source, "optimizer state lacks '" + key + "'", "restore the file");
    return it->second;
  };
  torch::NoGradGuard no_grad;
  for (auto& g : groups_) {
    int64_t needed = 0, covered = 0;
    const auto mine_ranges = owned_ranges(g);
    for (const auto& r : mine_ranges) needed += r.numel;
    for (const auto& sh : shards) {
      const auto& ranges = get(sh, g.name + ".ranges");
      const auto& m = get(sh, g.name + ".exp_avg");
      const auto& v = get(sh, g.name + ".exp_avg_sq");
      if (ranges.dim() != 2 || ranges.size(1) != 3 || ranges.scalar_type() != torch::kInt64)
        throw runtime_error(sh.source, "'" + g.name + ".ranges' has the wrong shape or type", "restore the file");
      auto acc = ranges.accessor<int64_t, 2>();
      for (int64_t k = 0; k < ranges.size(0); ++k) {
        const int64_t so = acc[k][0], uo = acc[k][1], n = acc[k][2];
        if (so < 0 || n < 0 || so + n > m.numel() || so + n > v.numel() || uo < 0 || uo + n > g.numel)
          throw runtime_error(sh.source, "'" + g.name + ".ranges' points outside the saved state", "restore the file");
        for (const auto& r : mine_ranges) {
          const int64_t lo = std::max(uo, r.unpadded_offset), hi = std::min(uo + n, r.unpadded_offset + r.numel);
          if (hi <= lo) continue;
          g.m.narrow(0, r.state_offset + lo - r.unpadded_offset, hi - lo).copy_(m.narrow(0, so + lo - uo, hi - lo));
          g.v.narrow(0, r.state_offset + lo - r.unpadded_offset, hi - lo).copy_(v.narrow(0, so + lo - uo, hi - lo));
          covered += hi - lo;
        }
      }
    }
    if (covered != needed)
      throw runtime_error(shards.front().source, "the optimizer shards cover " + std::to_string(covered) + " of the " +
                                                     std::to_string(needed) + " " + g.name + " values this rank needs",
                          "a rank_R.safetensors file is missing or duplicated; restore the checkpoint");
  }
  const auto& step = get(shards.front(), "step");
  if (step.numel() != 1) throw runtime_error(shards.front().source, "'step' must hold one value", "restore the file");
  step_ = step.item<int64_t>();
  // The master copy follows the restored parameters.
  for (auto& g : groups_)
    if (g.master.defined())
      for (const auto& pc : pieces(g)) g.master.narrow(0, pc.state_offset, pc.numel).copy_(g.params.narrow(0, pc.offset, pc.numel));
}

}  // namespace dsopen::train
