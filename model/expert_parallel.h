// Expert parallelism (DeepSeek-V3 §3.2; GShard's all-to-all dispatch): the routed experts of every MoE block are
// split over the E ranks of an expert-parallel group, rank r holding experts [r·n/E, (r+1)·n/E) under their global
// indices (so the weights keep their HF names). A token is routed where it is, sent to the rank that holds its
// expert by one all-to-all, and its output comes back by a second. What moves the rows (c10d, in train/) is behind
// ExpertExchange, so the model knows nothing of process groups.
#pragma once

#include <torch/torch.h>

#include <memory>
#include <string>
#include <vector>

namespace dsopen::model {

// Which routed experts this process holds: rank `rank` of `size`.
struct ExpertPlacement {
  int rank = 0, size = 1;
  bool sharded() const { return size > 1; }
  int64_t first(int64_t experts) const { return experts / size * rank; }
  int64_t count(int64_t experts) const { return experts / size; }
};

// While alive, MoE blocks built on this thread hold only `placement`'s experts (the trainer builds the model
// inside one). Nested scopes restore the outer placement.
class ExpertPlacementScope {
public:
  explicit ExpertPlacementScope(ExpertPlacement placement);
  ~ExpertPlacementScope();
  ExpertPlacementScope(const ExpertPlacementScope&) = delete;
  ExpertPlacementScope& operator=(const ExpertPlacementScope&) = delete;
  static ExpertPlacement current();

private:
  ExpertPlacement saved_;
};

// Set while activation checkpointing recomputes a layer in backward: its exchanges repeat the forward's, so
// statistics must not count them again.
class RecomputeScope {
public:
  RecomputeScope();
  ~RecomputeScope();
  RecomputeScope(const RecomputeScope&) = delete;
  RecomputeScope& operator=(const RecomputeScope&) = delete;
  static bool active();

private:
  bool saved_;
};

// Moves rows between the ranks of the expert-parallel group.
class ExpertExchange {
public:
  virtual ~ExpertExchange() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // in [sum(send), ...]: rows send[0] go to rank 0, the next send[1] to rank 1, ...; returns [sum(recv), ...] with
  // the recv[r] rows of rank r in rank order. Every rank of the group calls it, with matching sizes.
  virtual torch::Tensor all_to_all(const torch::Tensor& in, const std::vector<int64_t>& send,
                                   const std::vector<int64_t>& recv) = 0;
};

// all_to_all as an autograd function: the backward sends the output's gradient back the way it came.
torch::Tensor exchange_rows(ExpertExchange& exchange, const torch::Tensor& in, const std::vector<int64_t>& send,
                            const std::vector<int64_t>& recv);

// How the rows a rank receives are laid out for its experts. A rank receives, from each source rank s in turn,
// rows grouped by its local expert l (counts[s][l]); the experts want them grouped by expert.
struct ReceivedLayout {
  std::vector<int64_t> per_expert;  // [L] rows each local expert receives, from all ranks
  std::vector<int64_t> per_source;  // [E] rows received from each rank
  torch::Tensor to_expert_order;    // [R] int64: received row i lands at position to_expert_order[i] of the
                                    // expert-grouped order (sources in rank order within an expert)
};
// `counts` [E * L] int64 on the CPU: counts[s * L + l] rows from rank s for local expert l.
ReceivedLayout received_layout(const torch::Tensor& counts, int64_t local_experts);

// Whether an HF tensor or parameter name belongs to a routed expert (...experts.<index>....: DeepSeek, Qwen, Mixtral;
// not shared_experts / shared_expert). LoRA adapters of routed experts count too.
bool is_routed_expert_name(const std::string& name);

}  // namespace dsopen::model
