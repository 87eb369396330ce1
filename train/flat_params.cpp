#include "train/flat_params.h"

#include <algorithm>
#include <cmath>

namespace dsopen::train {

namespace {

// Buckets at parameter boundaries, each padded to a multiple of the world size; returns the padded size.
int64_t lay_out(FlatGroup& g, const std::vector<std::pair<std::string, torch::Tensor>>& members, const ShardingOptions& sh) {
  const int64_t N = sh.world_size;
  int64_t padded = 0, unpadded = 0;
  for (size_t i = 0; i < members.size(); ++i) {
    int64_t unit = -1;
    bool low = false;
    if (sh.unit_of) {
      unit = sh.unit_of(members[i].first);
      if (unit < 0) throw std::invalid_argument("FlatParams: parameter " + members[i].first + " belongs to no unit");
      low = sh.low_precision && sh.low_precision(members[i].first);
    }
    const bool cut = g.buckets.empty() ||
                     (sh.unit_of ? unit != g.buckets.back().unit || low != g.buckets.back().low_precision
                                 : sh.bucket_numel > 0 && g.buckets.back().unpadded_numel >= sh.bucket_numel);
    if (cut) {
      FlatBucket b;
      b.offset = padded;
      b.unpadded_offset = unpadded;
      b.unit = unit;
      b.low_precision = low;
      g.buckets.push_back(b);
    }
    FlatBucket& b = g.buckets.back();
    const int64_t n = members[i].second.numel();
    g.offsets.push_back(b.offset + b.unpadded_numel);
    g.numels.push_back(n);
    g.names.push_back(members[i].first);
    g.tensors.push_back(members[i].second);
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
  return padded;
}

}  // namespace

FlatParams::FlatParams(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, bool decay_embeddings,
                       const ShardingOptions& sh)
    : sharding_(sh) {
  const int64_t N = sh.world_size;
  if (N < 1 || sh.rank < 0 || sh.rank >= N) throw std::invalid_argument("FlatParams: bad rank/world size");
  if (!sh.whole_grads && !sh.shard_state) throw std::invalid_argument("FlatParams: sharded gradients need sharded state");
  if (sh.shard_params && sh.whole_grads) throw std::invalid_argument("FlatParams: sharded parameters need sharded gradients");
  if (sh.frozen && !sh.shard_params) throw std::invalid_argument("FlatParams: a frozen layout only shards parameters");
  std::vector<std::pair<std::string, torch::Tensor>> members[2];  // [no decay, decay]
  for (const auto& [name, p] : named_params) {
    if (p.requires_grad() == sh.frozen) continue;
    if (sh.frozen) {  // no decay split (nothing steps these), one group per dtype: fp32 and the base's (bf16)
      const int k = p.scalar_type() == torch::kFloat32 ? 0 : 1;
      if (!members[k].empty() && members[k].front().second.scalar_type() != p.scalar_type())
        throw std::invalid_argument("FlatParams: frozen parameters of more than two dtypes (" + name + ")");
      members[k].push_back({name, p});
      continue;
    }
    const bool embedding = name.find("embed_tokens") != std::string::npos;
    members[p.dim() >= 2 && (!embedding || decay_embeddings)].push_back({name, p});
  }
  torch::NoGradGuard no_grad;
  for (int d = 1; d >= 0; --d) {
    if (members[d].empty()) continue;
    std::reverse(members[d].begin(), members[d].end());  // backward produces the last layers' gradients first
    FlatGroup g;
    g.name = sh.frozen ? std::string("frozen_") + c10::toString(members[d].front().second.scalar_type())
                       : d ? "decay" : "no_decay";
    g.decay = d == 1 && !sh.frozen;
    const int64_t padded = lay_out(g, members[d], sh);
    const auto opts = members[d].front().second.options()
                          .dtype(sh.frozen ? members[d].front().second.scalar_type() : torch::kFloat32)
                          .device(sh.device ? *sh.device : members[d].front().second.device());
    if (sh.shard_params) {
      // Only this rank's slice of each bucket, cut from the bucket's values assembled one bucket at a time.
      g.params = torch::zeros({padded / N}, opts);
      for (const auto& b : g.buckets) {
        auto whole = torch::zeros({b.numel}, opts);
        for (const size_t i : b.params)
          whole.narrow(0, g.offsets[i] - b.offset, g.numels[i]).copy_(g.tensors[i].detach().reshape({-1}));
        g.params.narrow(0, b.shard_offset, b.numel / N).copy_(whole.narrow(0, sh.rank * (b.numel / N), b.numel / N));
      }
    } else {
      g.params = torch::zeros({padded}, opts);
      for (size_t i = 0; i < g.tensors.size(); ++i) {
        auto& p = g.tensors[i];
        auto slot = g.params.narrow(0, g.offsets[i], g.numels[i]);
        slot.copy_(p.detach().reshape({-1}));
        p.set_data(slot.view(p.sizes()));  // the parameter now lives in the buffer
      }
    }
    if (sh.frozen) {
      // no gradients
    } else if (sh.whole_grads) {
      g.grads = torch::zeros({padded}, opts);
      for (size_t i = 0; i < g.tensors.size(); ++i)  // backward accumulates in place here
        g.tensors[i].mutable_grad() = g.grads.narrow(0, g.offsets[i], g.numels[i]).view(g.tensors[i].sizes());
    } else {
      g.shard_grads = torch::zeros({padded / N}, opts);
    }
    groups_.push_back(std::move(g));
    if (sh.offload) {
      FlatGroup& gg = groups_.back();
      auto host = torch::TensorOptions().dtype(torch::kFloat32).device(torch::kCPU);
      if (opts.device().is_cuda()) host = host.pinned_memory(true);  // async-capable copies
      gg.master = torch::zeros({owned_numel(gg)}, host);
    }
  }
  refresh_master();
}

std::vector<FlatPiece> FlatParams::pieces(const FlatGroup& g) const {
  if (!sharding_.shard_state) return {{0, g.params.numel(), 0, nullptr}};
  std::vector<FlatPiece> out;
  for (const auto& b : g.buckets) {
    const int64_t slice = b.numel / sharding_.world_size;
    out.push_back({sharding_.shard_params ? b.shard_offset : b.offset + sharding_.rank * slice, slice, b.shard_offset, &b});
  }
  return out;
}

std::vector<FlatRange> FlatParams::owned_ranges(const FlatGroup& g) const {
  std::vector<FlatRange> out;
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

int64_t FlatParams::owned_numel(const FlatGroup& g) const {
  if (sharding_.shard_params) return g.params.numel();
  return sharding_.shard_state ? g.params.numel() / sharding_.world_size : g.params.numel();
}

void FlatParams::zero_grad() {
  for (auto& g : groups_) (sharding_.whole_grads ? g.grads : g.shard_grads).zero_();
}

torch::Tensor FlatParams::grad(const FlatGroup& g, const FlatPiece& pc) const {
  return sharding_.whole_grads ? g.grads.narrow(0, pc.offset, pc.numel) : g.shard_grads.narrow(0, pc.state_offset, pc.numel);
}

namespace {
// Sum of squares of a flat float32 buffer, accurate to ~1e-9 relative. One float32 reduction over the whole
// buffer is off by 1e-6 (1M values) to 4e-3 (50M values) relative, and by a different amount for every way the
// buffer is partitioned, so ranks holding slices (ZeRO-2) and one rank holding everything would clip differently;
// casting to float64 first costs a double-sized copy and 20x the time. Norms of 1024-value rows in float32 (one
// kernel), squared and summed in float64, cost what the plain reduction costs.
double sum_of_squares(const torch::Tensor& flat) {
  constexpr int64_t kRow = 1024;
  const int64_t whole = flat.numel() / kRow * kRow;
  double sq = 0;
  if (whole > 0)
    sq += torch::linalg_vector_norm(flat.narrow(0, 0, whole).view({-1, kRow}), 2, {1}, false, c10::nullopt)
              .to(torch::kFloat64)
              .pow(2)
              .sum()
              .item<double>();
  if (whole < flat.numel()) {
    const double rest = torch::linalg_vector_norm(flat.narrow(0, whole, flat.numel() - whole), 2, c10::nullopt, false,
                                                  c10::nullopt)
                            .item<double>();
    sq += rest * rest;
  }
  return sq;
}
}  // namespace

double FlatParams::grad_norm() const {
  double sq = 0;
  for (const auto& g : groups_) sq += sum_of_squares(sharding_.whole_grads ? g.grads : g.shard_grads);
  return std::sqrt(sq);
}

void FlatParams::scale_grads(double factor) {
  for (auto& g : groups_) (sharding_.whole_grads ? g.grads : g.shard_grads).mul_(factor);
}

void FlatParams::refresh_master() {
  torch::NoGradGuard no_grad;
  for (auto& g : groups_)
    if (g.master.defined())
      for (const auto& pc : pieces(g)) g.master.narrow(0, pc.state_offset, pc.numel).copy_(g.params.narrow(0, pc.offset, pc.numel));
}

int64_t FlatParams::num_params() const {
  int64_t n = 0;
  for (const auto& g : groups_) n += g.numel;
  return n;
}

int64_t FlatParams::grad_bytes() const {
  int64_t n = 0;
  for (const auto& g : groups_) n += (sharding_.whole_grads ? g.grads : g.shard_grads).numel();
  return n * 4;
}

int64_t FlatParams::master_bytes() const {
  int64_t n = 0;
  for (const auto& g : groups_) n += g.master.defined() ? g.master.numel() : 0;
  return n * 4;
}

}  // namespace dsopen::train
