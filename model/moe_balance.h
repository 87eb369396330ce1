// MoE load balancing and load metrics over every MoE block of a model (CausalLM::moe_blocks(): the main stack and
// the MTP modules alike). One step: reset(), add() each micro-batch's ForwardOutput::expert_load, sum the packed
// loads over ranks, then update_biases() after the optimizer step (DeepSeek-V3 §2.1.2, aux-loss-free balancing:
// bias += speed * sign(mean load - load)) and read the imbalance for the logs.
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

#include "model/transformer.h"

namespace dsopen::model {

class MoEBalancer {
public:
  explicit MoEBalancer(const CausalLMImpl& model);

  bool empty() const { return blocks_.empty(); }
  size_t size() const { return blocks_.size(); }
  const std::string& name(size_t block) const { return blocks_[block].name; }

  // Clears the step's loads.
  void reset();
  // Adds one forward pass's loads, in moe_blocks() order; a pass may cover a prefix of the blocks.
  void add(const std::vector<torch::Tensor>& expert_load);
  // The step's loads as one float64 CPU vector [blocks * experts], to sum over ranks, and back.
  torch::Tensor packed() const { return loads_.reshape({-1}); }
  void unpack(const torch::Tensor& flat);

  // Moves every block's correction bias one step of `speed` towards balance (no-op without biases or at speed 0).
  void update_biases(double speed);

  // Per block: the busiest expert's load over the mean load (1 = balanced; 0 for a block that saw no tokens).
  std::vector<double> imbalance_per_block() const;
  // Mean of imbalance_per_block() over blocks.
  double imbalance() const;
  // [experts] tokens routed to each expert of a block this step.
  torch::Tensor load(size_t block) const { return loads_[static_cast<int64_t>(block)]; }

private:
  std::vector<MoEBlock> blocks_;
  torch::Tensor loads_;  // [blocks, experts] float64 on the CPU
};

}  // namespace dsopen::model
