// Data parallelism over the flat, bucketed parameter layout of train/flat_params.h (docs/ARCHITECTURE.md). LibTorch has no C++ DDP or FSDP, so the
// strategies are written here on three c10d collectives:
//
//   ddp    gradients all-reduced bucket by bucket as backward finishes each bucket; every rank steps everything.
//   zero1  the same all-reduce; each rank keeps Adam moments for its slices only, steps them, and all-gathers the
//          updated parameters.
//   zero2  gradients reduce-scattered bucket by bucket as backward produces them, so a rank only ever holds its
//          slices plus a couple of buckets in flight; moments and the step as zero1.
//   zero3  the parameters sharded too: buckets follow the model's units (model/param_units.h), each gathered just
//          before it runs and freed after, its gradients reduce-scattered when its backward is done
//          (train/sharded_units.h); the step updates the owned slices and nothing is all-gathered after it.
//
// Gradient accumulation: ddp and zero1 communicate once per optimizer step, on the last micro-step (the earlier
// ones accumulate locally into the whole gradient buffer, like no_sync()). zero2 reduce-scatters on every
// micro-step: holding whole gradients across micro-steps would cost the memory ZeRO-2 exists to save.
//
// The loss each rank backpropagates is already divided by the global batch's target count, so gradients are
// summed across ranks, not averaged.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "train/optimizer.h"
#include "train/process_group.h"
#include "train/sharded_units.h"

namespace dsopen::train {

enum class Strategy { None, Ddp, Zero1, Zero2, Zero3 };
const std::vector<std::pair<std::string, Strategy>>& strategy_names();  // "none", "ddp", "zero1", "zero2", "zero3"
std::string to_string(Strategy s);

// zero3: how the model splits into units (model/param_units.h) and what the gathered parameters hold.
struct UnitLayout {
  std::function<int64_t(const std::string&)> unit_of;
  int64_t units = 0, layers = 0;
  torch::ScalarType compute_dtype = torch::kFloat32;  // bf16/fp16 under autocast: half the bytes gathered
  std::function<bool(const std::string&)> low_precision;  // the parameters gathered in it (projection weights)
  std::optional<torch::Device> device;                // where the shards live (the parameters may be elsewhere)
  // Ranks hold the same values to cut their slices from: broadcast rank 0's first. False when the ranks build their
  // models in turns (no collective is possible then; they built from the same seed and files).
  bool broadcast = true;
};

struct DataParallelOptions {
  Strategy strategy = Strategy::None;
  double bucket_mb = 25;
  bool offload_optimizer = false;  // moments and the step on the CPU (ZeRO-Offload)
  UnitLayout units;                // zero3 only
};

// Expert parallelism (train/expert_parallel.h): the routed-expert parameters this rank holds are a second flat
// layout of their own, under the same strategy over `replicas` (the ranks that hold the same experts); their
// gradient norm adds up over `experts` (the ranks that together hold every expert).
struct ExpertShards {
  std::vector<std::pair<std::string, torch::Tensor>> params;
  std::shared_ptr<ProcessGroup> replicas, experts;
};

class DataParallel {
public:
  // `named_params`: the replicated parameters (everything without expert parallelism), over `group` (the world).
  DataParallel(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, const AdamWOptions& adamw,
               const DataParallelOptions& options, std::shared_ptr<ProcessGroup> group, ExpertShards experts = {});
  ~DataParallel();
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  // Makes every rank start from rank 0's parameters (zero3 did it before sharding them).
  void broadcast_parameters();
  void zero_grad();
  // Bracket each micro-step's backward: `last` marks the micro-step after which gradients must be complete.
  void begin_micro_step(bool last);
  void end_micro_step();
  double grad_norm();  // global, one all-reduce under zero2
  void scale_grads(double factor);
  void step(double lr);  // optimizer step on the owned slices, then all-gather (zero1/zero2)

  FlatAdamW& optimizer() { return *opt_; }
  const FlatAdamW& optimizer() const { return *opt_; }
  // The routed experts' part under expert parallelism (null without).
  DataParallel* experts() { return experts_.get(); }
  const DataParallel* experts() const { return experts_.get(); }
  ProcessGroup& group() { return *group_; }
  Strategy strategy() const { return options_.strategy; }
  // zero3: this part's units (null otherwise), and the hooks the model must call (CausalLMImpl::set_unit_hooks):
  // these units', then the routed experts' under expert parallelism.
  ShardedUnits* sharded_units() { return units_.get(); }
  model::UnitHooks* unit_hooks();

  // Totals of this rank, the routed experts' part included.
  int64_t state_bytes() const { return opt_->state_bytes() + (experts_ ? experts_->state_bytes() : 0); }
  // Gradient memory of this rank: the gradient buffer plus (zero2) the peak of buckets in flight.
  int64_t grad_bytes() const { return opt_->grad_bytes() + grad_scratch_peak_bytes() + (experts_ ? experts_->grad_bytes() : 0); }
  int64_t grad_scratch_peak_bytes() const { return peak_scratch_bytes_ + (units_ ? units_->peak_reduce_bytes() : 0); }
  int64_t max_bucket_bytes() const;  // zero3: the largest unit's gathered bytes
  // Parameter memory of this rank: the fp32 flat buffers it keeps (zero3: its slices, and those of a frozen
  // base), and (zero3) the peak of gathered units.
  int64_t param_bytes() const;
  int64_t gathered_param_peak_bytes() const { return units_ ? units_->peak_gathered_bytes() : 0; }
  // What the ZeRO paper's formula predicts for fp32 Adam with P trainable parameters on N ranks:
  // moments 8P (ddp) or 8P/N; gradients 4P (ddp, zero1) or 4P/N (zero2, zero3).
  double predicted_state_bytes() const;
  double predicted_grad_bytes() const;
  // Seconds spent blocked on collectives since the last call.
  double take_comm_wait_seconds();

  void on_grad_ready(size_t param_index);  // called by the autograd hooks

private:
  struct BucketState;
  struct Pending;
  void launch(size_t bucket_index);
  void complete_oldest();

  DataParallelOptions options_;
  std::shared_ptr<ProcessGroup> group_;
  std::unique_ptr<FlatAdamW> opt_;
  std::vector<std::unique_ptr<BucketState>> buckets_;
  std::vector<std::pair<size_t, size_t>> param_slot_;  // param index -> (bucket index, param index in group)
  std::vector<std::unique_ptr<Pending>> pending_;
  std::vector<std::pair<std::shared_ptr<torch::autograd::Node>, uintptr_t>> hooks_;
  bool last_micro_step_ = true;
  size_t next_launch_ = 0;  // buckets before it have been launched in this micro-step
  int64_t scratch_bytes_ = 0, peak_scratch_bytes_ = 0;
  double comm_wait_s_ = 0;
  std::unique_ptr<FlatParams> frozen_;    // zero3 with a frozen base (LoRA): its slices
  std::unique_ptr<ShardedUnits> units_;  // zero3
  std::unique_ptr<model::UnitHooks> both_units_;  // zero3 + expert parallelism: units_, then the experts' units
  std::unique_ptr<DataParallel> experts_;
  std::shared_ptr<ProcessGroup> expert_group_;  // sums the experts' gradient norm
};

}  // namespace dsopen::train
