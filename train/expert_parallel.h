// The process groups of expert parallelism (parallel.expert_parallel: E) and the exchange its MoE blocks move rows
// with (model/expert_parallel.h). Rank r of a world of N sits in the expert-parallel group of ranks
// [E·⌊r/E⌋, E·⌊r/E⌋ + E) — together they hold every routed expert, rank r the share r mod E — and in the replica
// group of the N/E ranks r mod E, r mod E + E, ..., which hold the same share and reduce its gradients.
#pragma once

#include <memory>
#include <vector>

#include "model/expert_parallel.h"
#include "train/process_group.h"

namespace dsopen::train {

struct ExpertGroups {
  int64_t size = 1;                        // E
  std::shared_ptr<ProcessGroup> experts;   // the E ranks of this rank's expert-parallel group
  std::shared_ptr<ProcessGroup> replicas;  // the N/E ranks holding the same experts
  model::ExpertPlacement placement() const { return {experts ? experts->rank() : 0, static_cast<int>(size)}; }
};

// Both groups of this rank (every rank of `world` calls it). A usage error naming both numbers when E does not
// divide the world size.
ExpertGroups make_expert_groups(ProcessGroup& world, int64_t expert_parallel);

// The exchange over an expert-parallel group, timing its all-to-alls.
class GroupExchange final : public model::ExpertExchange {
public:
  explicit GroupExchange(std::shared_ptr<ProcessGroup> group) : group_(std::move(group)) {}
  int rank() const override { return group_->rank(); }
  int size() const override { return group_->size(); }
  torch::Tensor all_to_all(const torch::Tensor& in, const std::vector<int64_t>& send,
                           const std::vector<int64_t>& recv) override;

  // Since the last call: seconds inside all-to-alls (recomputations included), and the token copies dispatched to
  // this rank's experts from every rank (forward passes; recomputations by activation checkpointing not counted).
  struct Totals {
    double seconds = 0;
    int64_t rows_received = 0;
  };
  Totals take_totals();

private:
  std::shared_ptr<ProcessGroup> group_;
  Totals totals_;
};

}  // namespace dsopen::train
