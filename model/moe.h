// Mixture-of-experts blocks: DeepSeekMoE (DeepSeek-V2 §2.2, V3 §2.1.2: fine-grained routed experts plus always-on
// shared experts), Qwen-MoE (softmax top-k; Qwen2-MoE adds one shared expert scaled by sigmoid(shared_expert_gate(x)))
// and Mixtral (softmax top-2, always normalised). The architecture traits (model/arch.h) name the modules.
//
// Routing: scores = softmax or sigmoid of the gate logits (float32). Selection may be group-limited: the experts
// are split into n_group groups, each group ranked (V2 `group_limited_greedy`: by its best score; V3 `noaux_tc`:
// by the sum of its two best bias-corrected scores) and only the topk_group best groups compete. V3 adds
// e_score_correction_bias to the scores for *selection only*; the combine weights are the unbiased scores.
// The bias is not trained by gradients: after each optimizer step it moves by ±speed towards balanced load
// (aux-loss-free balancing). A sequence-wise balance loss (coefficient aux_loss_alpha) may be added.
// Statistics (expert load, balance loss) count only the positions of a `token_mask`: the trainer passes the
// positions that carry a loss target, so padding and other masked positions never move a bias or a loss term.
//
// Dispatch: token-expert pairs are sorted by expert, each expert runs once on its contiguous block, and the
// results are scattered back weighted — no per-token loops. Under expert parallelism (model/expert_parallel.h) a
// block holds only its rank's experts; the sorted rows travel to their experts' ranks and back by all-to-all.
#pragma once

#include <torch/torch.h>

#include "model/config.h"
#include "model/expert_parallel.h"
#include "model/layers.h"

namespace dsopen::model {

struct Routing {
  torch::Tensor indices;  // [N, K] int64, chosen experts
  torch::Tensor weights;  // [N, K] float32, combine weights (scaled)
  torch::Tensor scores;   // [N, E] float32, softmax/sigmoid scores without bias
};

// Pure routing function: `logits` [N, E] float32, `bias` [E] or undefined.
Routing route(const torch::Tensor& logits, const torch::Tensor& bias, const ModelConfig& c);

// Sequence-wise balance loss (DeepSeek-V3 eqs. 17-20): for each balance unit (a sequence; with seq_aux false
// the whole batch) alpha * sum_i f_i * P_i, where over the unit's T' counted positions f_i = E/(K*T') * (positions
// routed to i) and P_i = mean of the normalized score of i. Returns the *sum* over units that have a counted
// position, so the trainer can divide by the global number of units (see model/loss.h).
// scores [B*T, E], indices [B*T, K], valid [B*T] bool (undefined: every position counts).
torch::Tensor balance_loss_sum(const torch::Tensor& scores, const torch::Tensor& indices, const torch::Tensor& valid,
                               int64_t batch, const ModelConfig& c);
// Balance units of a [B, T] mask of counted positions: sequences with one (seq_aux) or 1 for the batch.
int64_t balance_units(const torch::Tensor& valid, const ModelConfig& c);
// The mean over units with every position counted (the formula above averaged over sequences).
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
  torch::Tensor aux_sum;   // scalar: balance_loss_sum over this call's units (zero when alpha == 0 or not training)
  torch::Tensor load;      // [E] int64, counted positions routed to each expert in this call
  torch::Tensor dropped;   // [2] int64 with a capacity factor in training: token copies dropped, and routed
};

// Rows of each expert's block in the dispatch layout. oneDNN, which runs bf16 GEMMs on the CPU, compiles and
// caches a kernel per GEMM shape: with a block height that changes every step the cache (and the process's memory)
// grows for hundreds of steps, and odd heights run slower. Blocks of more than kExpertRowMultiple rows are padded
// to a multiple of it when the expert GEMMs run in bf16/fp16 on the CPU (measured: tiny MoE bf16 train step +8%
// tokens/s, peak RSS over 40 steps 1.68 -> 1.06 GB; moe-small bf16 +38%); smaller blocks (decoding) never are.
inline constexpr int64_t kExpertRowMultiple = 64;
struct ExpertBlocks {
  std::vector<int64_t> sizes;  // [E] rows per expert block, padding included
  int64_t rows = 0;            // sum of sizes
  bool padded = false;         // any padding rows
  torch::Tensor shift;         // [E] int64: padded start of block e minus its unpadded start
};
ExpertBlocks expert_blocks(const std::vector<int64_t>& counts, bool pad);
// Whether x's expert GEMMs run in a low-precision dtype on the CPU (bf16/fp16 input, or CPU autocast on).
bool lowp_cpu_gemms(const torch::Tensor& x);

// Routed-expert outputs `y` [rows, hidden] with the token each row goes back to and its combine weight [rows].
struct ExpertRows {
  torch::Tensor y, token, weight;
};

class MoEImpl : public torch::nn::Module {
public:
  explicit MoEImpl(const ModelConfig& c);
  // x [B, T, hidden]; token_mask [B, T] bool, the positions statistics count (undefined: all).
  MoEOutput forward(const torch::Tensor& x, const torch::Tensor& token_mask = {});

  // Aux-loss-free balancing: bias += speed * sign(mean(load) - load) with `load` the tokens per expert since the
  // last update (the trainer sums it over micro-batches and ranks first). No-op without a correction bias.
  void update_bias(const torch::Tensor& load, double speed);

  // The routed experts this block holds (all of them unless built inside an ExpertPlacementScope) and, when it
  // holds a share, the exchange that reaches the others (set before the first forward).
  const ExpertPlacement& placement() const { return placement_; }
  void set_exchange(std::shared_ptr<ExpertExchange> exchange) { exchange_ = std::move(exchange); }
  // Routed expert `e` (global index); an error when this block does not hold it.
  MLP expert(int64_t e) const;

  Gate gate{nullptr};
  std::shared_ptr<torch::nn::Module> experts;  // children named by global expert index (HF names)
  MLP shared_experts{nullptr};   // DeepSeek: n_shared_experts * moe_intermediate_size wide, always on
  MLP shared_expert{nullptr};    // Qwen2-MoE: shared_expert_intermediate_size wide, scaled by ...
  Linear shared_expert_gate{nullptr};  // ... sigmoid(shared_expert_gate(x)), [1, hidden]

private:
  // The routed experts' outputs for the expert-sorted pairs: token_of [N*K] rows of `flat` [N, hidden] with weights
  // w_sorted [N*K], `counts` [E] pairs per expert (sorted_experts [N*K]: the expert of each): here (blocks maybe
  // padded), or on the ranks that hold them.
  ExpertRows local_experts(const torch::Tensor& flat, const torch::Tensor& token_of, const std::vector<int64_t>& counts,
                           const torch::Tensor& sorted_experts, const torch::Tensor& w_sorted);
  ExpertRows remote_experts(const torch::Tensor& flat, const torch::Tensor& token_of, const std::vector<int64_t>& counts,
                            const torch::Tensor& w_sorted);
  // Runs local expert l on block l of `x` [rows, hidden] (blocks of `sizes` rows); an expert with no real rows
  // runs only when `all` (training: its zero gradient keeps the gradient buckets complete).
  torch::Tensor run_blocks(const torch::Tensor& x, const std::vector<int64_t>& sizes, const std::vector<int64_t>& real,
                           bool all);

  ModelConfig config_;
  ExpertPlacement placement_;
  std::shared_ptr<ExpertExchange> exchange_;
  std::vector<MLP> expert_list_;  // the held experts, in index order
};
TORCH_MODULE(MoE);

}  // namespace dsopen::model
