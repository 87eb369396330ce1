// ZeRO-3 (fully sharded data parallelism, FSDP in PyTorch; Rajbhandari et al. 2020, "ZeRO", stage 3): each rank
// keeps slice r of every flat bucket (train/flat_params.h with shard_params), and the buckets follow the model's
// parameter units (model/param_units.h: the embedding, each decoder layer, the head, each MTP module). The model
// calls these hooks around every use of a unit:
//
//   before_forward   all-gather the unit (waiting for a prefetch issued earlier), then issue the next unit's
//                    all-gather so it travels while this one computes
//   after_forward    free the unit
//   before_backward  gather it again (and prefetch the unit before it: backward walks the layers in reverse)
//   after_backward   reduce-scatter its gradients into this rank's fp32 gradient slices, then free it
//
// A unit's parameters are views of one buffer per bucket whose storage is resized to zero bytes when freed and
// back when gathered (FSDP's flat-parameter trick): the views, and whatever autograd saved of them, stay valid
// and see the values gathered for backward. Under autocast the projection weights (model/param_units.h
// projection_weight_names) are gathered in the compute dtype, bf16 or fp16: half the bytes travel and are held,
// the values are exactly what autocast casts the fp32 weights to, and autograd saves them rather than a cast copy
// of each (which would keep every layer's weights in bf16 from forward to backward). Their gradients come out of
// the matmuls in that dtype, as unsharded; each is used once per pass, so none is accumulated in it. Everything
// else (embeddings, norms, the router, the head) is gathered in fp32. Gradients are reduced in fp32. Activation checkpointing needs nothing more: the
// recomputation runs inside the layer's backward, after before_backward gathered it.
#pragma once

#include <torch/torch.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "model/param_units.h"
#include "train/flat_params.h"
#include "train/process_group.h"

namespace dsopen::train {

class ShardedUnits final : public model::UnitHooks {
public:
  // `layouts`: the trainable parameters' and (LoRA) the frozen base's, laid out with shard_params and per-unit
  // buckets (FlatBucket::unit in [0, units)); units 1 .. `layers` are the decoder layers, `layers` + 1 the final
  // norm, `layers` + 2 the head (model/param_units.h). The parameters become views of the units' gather buffers, freed until first use:
  // buckets marked low_precision in `compute_dtype`, the others in the dtype their slices are kept in.
  ShardedUnits(const std::vector<FlatParams*>& layouts, ProcessGroup& group, int64_t units, int64_t layers,
               torch::ScalarType compute_dtype);
  ~ShardedUnits() override;
  ShardedUnits(const ShardedUnits&) = delete;
  ShardedUnits& operator=(const ShardedUnits&) = delete;

  void before_forward(int64_t unit) override;
  void after_forward(int64_t unit, bool backward_hooked) override;
  void before_backward(int64_t unit) override;
  void after_backward(int64_t unit) override;

  // End of a micro-step: reduce-scatters the units used since their last reduction without a backward hook (the
  // embedding), frees every unit still gathered and waits for the reductions in flight. Every rank calls it.
  void finish_micro_step();

  // The whole values of one unit's parameters (module names; fp32, frozen ones in their dtype), gathered from every
  // rank's slices without touching the model. Every rank calls it for the same units in the same order
  // (checkpoints stream this way). `trainable_only`: without the frozen base (a LoRA run's adapters).
  std::vector<std::pair<std::string, torch::Tensor>> gather_values(int64_t unit, bool trainable_only = false);
  // What gather_values(unit) returns, in its order, without gathering.
  struct Parameter {
    std::string name;
    std::vector<int64_t> shape;
    torch::ScalarType dtype;
  };
  std::vector<Parameter> parameters(int64_t unit) const;
  int64_t units() const { return static_cast<int64_t>(units_.size()); }

  // Memory of the gathered parameters: now, the peak since reset_peak(), and the largest unit.
  int64_t gathered_bytes() const { return gathered_bytes_; }
  int64_t peak_gathered_bytes() const { return peak_gathered_bytes_; }
  int64_t largest_unit_bytes() const;
  void reset_peak() { peak_gathered_bytes_ = gathered_bytes_; }
  // Peak bytes of fp32 gradient buffers waiting for or in a reduce-scatter.
  int64_t peak_reduce_bytes() const { return peak_reduce_bytes_; }
  // Seconds spent blocked on collectives since the last call.
  double take_comm_wait_seconds();

private:
  struct Part;
  struct Unit;
  struct Reduction;
  void gather(int64_t unit, bool wait);
  void release(int64_t unit);
  void reduce(int64_t unit);
  void complete_oldest_reduction();
  double wait(std::vector<PendingWork>& works);

  ProcessGroup& group_;
  int64_t layers_;
  torch::ScalarType dtype_;
  std::vector<std::unique_ptr<Unit>> units_;
  std::vector<std::unique_ptr<Reduction>> reductions_;
  int64_t gathered_bytes_ = 0, peak_gathered_bytes_ = 0, reduce_bytes_ = 0, peak_reduce_bytes_ = 0;
  double comm_wait_s_ = 0;
};

}  // namespace dsopen::train
