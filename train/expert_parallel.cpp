#include "train/expert_parallel.h"

#include <chrono>
#include <numeric>

#include "utils/errors.h"

namespace dsopen::train {

ExpertGroups make_expert_groups(ProcessGroup& world, int64_t expert_parallel) {
  const int N = world.size(), E = static_cast<int>(expert_parallel);
  ExpertGroups g;
  g.size = E;
  if (E == 1) return g;
  if (N % E != 0)
    throw usage_error("parallel.expert_parallel", std::to_string(E) + " does not divide the " + std::to_string(N) +
                                                      " ranks started",
                      "start a multiple of " + std::to_string(E) + " ranks or choose a divisor of " + std::to_string(N));
  const int r = world.rank(), first = r / E * E;
  std::vector<int> experts(static_cast<size_t>(E)), replicas;
  std::iota(experts.begin(), experts.end(), first);
  for (int q = r % E; q < N; q += E) replicas.push_back(q);
  // Every rank creates its expert-parallel group first, then its replica group: no two ranks wait on each other in
  // opposite orders.
  g.experts = world.subgroup(experts, "expert_parallel." + std::to_string(first / E));
  g.replicas = world.subgroup(replicas, "expert_replicas." + std::to_string(r % E));
  return g;
}

torch::Tensor GroupExchange::all_to_all(const torch::Tensor& in, const std::vector<int64_t>& send,
                                        const std::vector<int64_t>& recv) {
  const auto t0 = std::chrono::steady_clock::now();
  auto src = in.to(group_->device()).contiguous();
  auto shape = src.sizes().vec();
  shape[0] = std::accumulate(recv.begin(), recv.end(), int64_t{0});
  auto out = torch::empty(shape, src.options());
  group_->all_to_all(out, src, recv, send).wait();  // a failure names the all_to_all and the group's size
  totals_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // The first exchange of each MoE forward carries the row counts per expert: what this rank's experts receive.
  if (in.dim() == 1 && in.scalar_type() == torch::kLong && !model::RecomputeScope::active())
    totals_.rows_received += out.sum().item<int64_t>();
  return out.to(in.device());
}

GroupExchange::Totals GroupExchange::take_totals() {
  Totals t = totals_;
  totals_ = {};
  return t;
}

}  // namespace dsopen::train
