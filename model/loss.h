// The training objective, composed in one place (the model's forward, evaluation and the trainer all use it):
//
//   loss = CE / N  +  z_loss_coef * Z / N  +  AUX / U  +  sum_k AUX_k / U_k  +  mtp_loss_weight * (1/D) sum_k CE_k / N_k
//
//   CE, Z       sums over the main head's targets of cross-entropy and of logsumexp(logits)^2 (z-loss, PaLM §5)
//   N           the number of those targets (labels != -100)
//   AUX         the sequence-wise balance loss (DeepSeek-V3 eqs. 17-20) of every main-stack MoE layer, summed over
//               balance units; U the number of units (sequences with a target, or batches with seq_aux false)
//   CE_k, N_k   MTP depth k (k = 1..D): cross-entropy summed over its targets (the token k+1 ahead, inside the same
//               document) and their number, which is smaller than N; AUX_k / U_k its MoE layer's balance loss
//
// A forward pass returns the sums (LossSums) of its micro-batch and the counts (LossCounts) it saw. Composing the
// sums of every micro-batch with the counts of the whole global batch (summed over micro-batches and ranks) gives
// the same step however the batch is split: each micro-batch's share is its sums over the global counts. Averaging
// per-micro-batch means instead is the gradient-accumulation bug transformers' Trainer had in 2024.
#pragma once

#include <torch/torch.h>

#include <vector>

#include "model/config.h"

namespace dsopen::model {

// Sums over one micro-batch (float32 scalars with autograd history).
struct LossSums {
  torch::Tensor ce;                    // main-head cross-entropy summed over its targets
  torch::Tensor z;                     // logsumexp^2 over the same targets (zero when z_loss_coef is 0)
  torch::Tensor aux;                   // balance loss of the main-stack MoE layers, summed over layers and units
  std::vector<torch::Tensor> mtp_ce;   // per MTP depth
  std::vector<torch::Tensor> mtp_aux;  // per MTP depth (its MoE layer)
};

// The denominators; add them up over micro-batches and ranks before composing a step's loss.
struct LossCounts {
  double targets = 0;                // N
  double units = 0;                  // U
  std::vector<double> mtp_targets;   // N_k
  std::vector<double> mtp_units;     // U_k

  LossCounts& operator+=(const LossCounts& o);
  // Flat form for one all-reduce: [N, U, N_1..N_D, U_1..U_D].
  std::vector<double> to_vector() const;
  static LossCounts from_vector(const std::vector<double>& v);
};

// The counts of a batch, computable before its forward pass: labels [B, T] (-100 = no target), segment_ids [B, T]
// of packed rows or undefined. Depth k's targets are labels[:, k:] at positions whose token k ahead is in the same
// document.
LossCounts count_loss_targets(const ModelConfig& c, const torch::Tensor& labels, const torch::Tensor& segment_ids);

// Depth k's targets [B, T-k] (-100 where none): the label k positions ahead, masked across document boundaries.
torch::Tensor mtp_targets(const torch::Tensor& labels, const torch::Tensor& segment_ids, int64_t k);

// The composed loss and its logged parts, each already normalized (float32 scalars).
struct Loss {
  torch::Tensor total;
  torch::Tensor ce;   // CE / N
  torch::Tensor z;    // z_loss_coef * Z / N
  torch::Tensor aux;  // AUX / U + sum_k AUX_k / U_k
  torch::Tensor mtp;  // (1/D) sum_k CE_k / N_k (before mtp_loss_weight)
};
Loss compose_loss(const LossSums& sums, const LossCounts& counts, const ModelConfig& c);

}  // namespace dsopen::model
