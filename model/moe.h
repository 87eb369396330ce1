// DeepSeekMoE (DeepSeek-V2 §2.2, V3 §2.1.2): fine-grained routed experts plus always-on shared experts.
//
// Routing: scores = softmax or sigmoid of the gate logits (float32). Selection may be group-limited: the experts
// are split into n_group groups, each group ranked (V2 `group_limited_greedy`: by its best score; V3 `noaux_tc`:
// by the sum of its two best bias-corrected scores) and only the topk_group best groups compete. V3 adds
// e_score_correction_bias to the scores for *selection only*; the combine weights are the unbiased scores.
// The bias is not trained by gradients: after each optimizer step it moves by ±speed towards balanced load
// (aux-loss-free balancing). A sequence-wise balance loss (coefficient aux_loss_alpha) may be added.
//
// Dispatch: token-expert pairs are sorted by expert, each expert runs once on its contiguous block, and the
// results are scattered back weighted — no per-token loops.
#pragma once

#include <torch/torch.h>

#include "model/config.h"
#include "model/layers.h"

namespace dsopen::model {

struct Routing {
  torch::Tensor indices;  // [N, K] int64, chosen experts
  torch::Tensor weights;  // [N, K] float32, combine weights (scaled)
  torch::Tensor scores;   // [N, E] float32, softmax/sigmoid scores without bias
};

// Pure routing function: `logits` [N, E] float32, `bias` [E] or undefined.
Routing route(const torch::Tensor& logits, const torch::Tensor& bias, const ModelConfig& c);

// Sequence-wise balance loss: alpha * sum_i f_i * P_i averaged over sequences, where f_i = E/(K*T) * (tokens of
// the sequence routed to i) and P_i = mean over the sequence of the normalized score of i.
// scores [B*T, E], indices [B*T, K]; with seq_aux false the whole batch counts as one sequence.
torch::Tensor balance_loss(const torch::Tensor& scores, const torch::Tensor& indices, int64_t batch,
                           const ModelConfig& c);

class GateImpl : public torch::nn::Module {
public:
  explicit GateImpl(const ModelConfig& c);
  torch::Tensor weight;                 // [E, hidden]
  torch::Tensor e_score_correction_bias;  // [E] buffer, noaux_tc only
};
TORCH_MODULE(Gate);

struct MoEOutput {
  torch::Tensor y;         // [B, T, hidden]
  torch::Tensor aux_loss;  // scalar (zero when alpha == 0 or not training)
  torch::Tensor load;      // [E] int64, tokens routed to each expert in this call
};

class MoEImpl : public torch::nn::Module {
public:
  explicit MoEImpl(const ModelConfig& c);
  MoEOutput forward(const torch::Tensor& x);

  // Aux-loss-free balancing: bias += speed * sign(mean(load) - load) with `load` the tokens per expert since the
  // last update (the trainer sums it over micro-batches and ranks first). No-op without a correction bias.
  void update_bias(const torch::Tensor& load, double speed);

  Gate gate{nullptr};
  torch::nn::ModuleList experts{nullptr};
  MLP shared_experts{nullptr};

private:
  ModelConfig config_;
  std::vector<MLP> expert_list_;
};
TORCH_MODULE(MoE);

}  // namespace dsopen::model
