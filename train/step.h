// One optimizer step over a global batch (docs/CONFIG.md §5.7): count every loss term's targets over the whole
// batch and all ranks, forward and backward each micro-batch on its share of the loss (model/loss.h), sum the
// logged terms and the MoE loads over ranks, unscale (fp16), take the global gradient norm, skip the step when
// anything is not finite, clip, step AdamW, and move the MoE routing biases.
#pragma once

#include <torch/torch.h>

#include <vector>

#include "data/batch.h"
#include "model/moe_balance.h"
#include "model/transformer.h"
#include "train/data_parallel.h"
#include "train/precision.h"
#include "train/process_group.h"

namespace dsopen::train {

struct StepStats {
  double loss = 0;       // main-head cross-entropy per target over the global batch
  double aux_loss = 0;   // MoE balance loss of every MoE block (weighted by aux_loss_alpha)
  double mtp_loss = 0;   // mean over MTP depths of their cross-entropy per target (before mtp_loss_weight)
  double z_loss = 0;     // z_loss_coef * mean logsumexp^2
  double grad_norm = 0;  // global L2 norm before clipping
  double moe_dropped = 0, moe_routed = 0;  // token copies dropped by model.capacity_factor, and routed (all ranks)
  double targets = 0;    // target tokens of the global batch, all ranks
  bool applied = false;  // false: the loss or the gradient was not finite and nothing was updated
};

struct StepOptions {
  double grad_clip = 1.0;         // 0: off
  bool update_routing_bias = true;  // false for LoRA, where the routing is frozen base state
};

// The model's inputs for a batch, on `device`.
model::ForwardInput forward_input(const data::Batch& batch, torch::Device device);

class TrainStep {
public:
  TrainStep(model::CausalLM model, DataParallel& dp, Precision& precision, torch::Device device, StepOptions options);

  // Runs one step over this rank's micro-batches of the global batch at learning rate `lr`.
  StepStats run(const std::vector<data::Batch>& micro_batches, double lr);

  const model::MoEBalancer& balancer() const { return balancer_; }

private:
  model::LossCounts global_counts(const std::vector<data::Batch>& micro_batches);
  void forward_backward(const std::vector<data::Batch>& micro_batches, const model::LossCounts& counts, StepStats& stats);
  void reduce_logged(StepStats& stats);

  model::CausalLM model_;
  DataParallel& dp_;
  Precision& precision_;
  torch::Device device_;
  StepOptions options_;
  model::MoEBalancer balancer_;
};

}  // namespace dsopen::train
