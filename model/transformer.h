// The DeepSeek-family causal language model: embedding -> decoder layers -> norm -> lm_head, plus optional
// multi-token-prediction (MTP) modules. Module names follow HuggingFace checkpoints:
//   model.embed_tokens, model.layers.N.{input_layernorm, self_attn.*, post_attention_layernorm, mlp.*},
//   model.norm, lm_head. MTP module k is registered as mtp.k.* and stored in HF files as
//   model.layers.{num_hidden_layers + k}.* (the checkpoint layer adds copies of embed_tokens and the head).
#pragma once

#include <torch/torch.h>

#include "model/attention.h"
#include "model/config.h"
#include "model/layers.h"
#include "model/loss.h"
#include "model/moe.h"
#include "model/param_units.h"

namespace dsopen::model {

struct LayerOutput {
  torch::Tensor h;
  torch::Tensor aux_sum;  // scalar balance-loss sum over units (model/loss.h); zero for dense layers
  torch::Tensor load;     // [E] for MoE layers, undefined for dense ones
  torch::Tensor dropped;  // [2] int64 (MoEOutput::dropped), undefined without a capacity factor
};

class DecoderLayerImpl : public torch::nn::Module {
public:
  DecoderLayerImpl(const ModelConfig& c, int64_t layer_index);
  // token_mask [B, T] bool: the positions MoE statistics count (undefined: all).
  LayerOutput forward(const torch::Tensor& x, const AttentionInput& in, const torch::Tensor& token_mask = {});
  bool is_moe() const { return static_cast<bool>(moe_); }
  MoE moe() const { return moe_; }
  Attention attention() const { return mha_; }  // null for MLA layers
  MLA mla() const { return mla_; }              // null for MHA/GQA layers
  MLP mlp() const { return mlp_; }              // null for MoE layers
  void init_cache(LayerKVCache& cache, int64_t batch, int64_t capacity, const torch::TensorOptions& opts) const;

  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  // GLM-4: norms on the attention and MLP outputs before each residual add (null elsewhere).
  RMSNorm post_self_attn_layernorm{nullptr}, post_mlp_layernorm{nullptr};

private:
  Attention mha_{nullptr};
  MLA mla_{nullptr};
  MLP mlp_{nullptr};
  MoE moe_{nullptr};
};
TORCH_MODULE(DecoderLayer);

// V3 MTP module k: h' = eh_proj([enorm(embed(t_{i+k})); hnorm(h_i)]) -> decoder layer -> shared_head.norm -> head.
class SharedHeadImpl : public torch::nn::Module {
public:
  SharedHeadImpl(int64_t hidden, double eps) { norm = register_module("norm", RMSNorm(hidden, eps)); }
  RMSNorm norm{nullptr};
};
TORCH_MODULE(SharedHead);

class MTPLayerImpl : public DecoderLayerImpl {
public:
  MTPLayerImpl(const ModelConfig& c, int64_t layer_index);
  RMSNorm enorm{nullptr}, hnorm{nullptr};
  Linear eh_proj{nullptr};
  SharedHead shared_head{nullptr};
};
TORCH_MODULE(MTPLayer);

class DeepSeekModelImpl : public torch::nn::Module {
public:
  explicit DeepSeekModelImpl(const ModelConfig& c);
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  std::vector<DecoderLayer> layer_list;
  RMSNorm norm{nullptr};
};
TORCH_MODULE(DeepSeekModel);

// Per-layer KV caches for incremental decoding.
struct KVCache {
  std::vector<LayerKVCache> layers;
  int64_t capacity = 0;
  int64_t length = 0;        // positions filled so far
  torch::Tensor key_valid;   // bool [B, capacity]: false for padding (batched prompts of different lengths)
};

// What one forward pass reads. Fields keep the order of their use, so `forward({ids, {}, &cache})` reads as "decode
// these ids against the cache".
struct ForwardInput {
  torch::Tensor input_ids;  // [B, T] int64
  torch::Tensor labels;     // [B, T] next-token targets (-100 = ignore), or undefined (inference: no loss)
  // With a cache, positions start at cache->length and the cache is extended (inference; no MTP, no loss).
  KVCache* cache = nullptr;
  // Packed rows pass position_ids and segment_ids [B, T] (see data::Batch): attention stays inside a document and
  // RoPE positions restart with each one. With a cache, segment_ids mark padding (0) in left-padded batches of
  // prompts: no query attends a padding key, and position_ids give each sequence its own positions.
  torch::Tensor position_ids;
  torch::Tensor segment_ids;
  // > 0 (inference, no labels): logits of the last that many positions only, [B, last_logits, V] (a prompt's
  // prefill needs one; the head is a large share of a small model's FLOPs).
  int64_t last_logits = 0;
  // With labels: also return the logits [B, T, V] (the fused head + loss, model/fused_ops.h, never forms them).
  bool keep_logits = false;
  // Continuous batching (serve/engine.h): rows decode one token each (T == 1) against cache rows of their own
  // lengths. Row b's token sits at position row_lengths[b], is written into cache row b at that index and attends
  // keys [0, row_lengths[b]]; cache->length is left alone (the caller keeps the lengths).
  std::vector<int64_t> row_lengths{};
};

struct ForwardOutput {
  torch::Tensor logits;    // [B, T, V] in the head's dtype; with labels only when keep_logits or ops are unfused
  // With labels: the terms of model/loss.h composed with this batch's own counts. A trainer that accumulates
  // micro-batches composes `sums` with the global batch's counts instead.
  torch::Tensor loss;      // ce + z + aux + mtp_loss_weight * mtp
  torch::Tensor ce_sum;    // sum of next-token cross-entropy over target tokens (float32)
  torch::Tensor n_targets; // number of labels != -100 (int64 scalar)
  torch::Tensor aux_loss;  // balance loss of every MoE block, each averaged over its balance units
  torch::Tensor mtp_loss;  // mean over MTP depths of their mean cross-entropy (0 without MTP)
  torch::Tensor z_loss;    // z_loss_coef * mean over targets of logsumexp(logits)^2 (0 when the coefficient is 0)
  LossSums sums;
  LossCounts counts;
  // [E] per MoE block that ran, in moe_blocks() order (main stack, then MTP modules): positions with a target
  // routed to each expert (every position without labels).
  std::vector<torch::Tensor> expert_load;
  // [2] int64 over every MoE block with model.capacity_factor in training: token copies dropped, and routed.
  torch::Tensor moe_dropped;
};

// One MoE block of a model, under its HF module name (model.layers.N.mlp, Mixtral model.layers.N.block_sparse_moe;
// MTP module k: model.layers.{L+k}.mlp).
struct MoEBlock {
  std::string name;
  MoE moe;
};

class CausalLMImpl : public torch::nn::Module {
public:
  explicit CausalLMImpl(const ModelConfig& c);

  ForwardOutput forward(const ForwardInput& in);
  // Training and evaluation without packing: forward({input_ids, labels}).
  ForwardOutput forward(const torch::Tensor& input_ids, const torch::Tensor& labels = {}) {
    ForwardInput in;
    in.input_ids = input_ids;
    in.labels = labels;
    return forward(in);
  }

  // Allocates caches for `batch` sequences of up to `capacity` positions.
  KVCache make_cache(int64_t batch, int64_t capacity, torch::Dtype dtype = torch::kFloat32) const;

  // Every MoE block, wherever it sits: main-stack layers, then MTP modules. Balancing, metrics and logging iterate
  // this list, so a block added anywhere takes part in all of them.
  std::vector<MoEBlock> moe_blocks() const;

  // Expert parallelism (model/expert_parallel.h): whether the MoE blocks hold only a share of the routed experts
  // (the model was built inside an ExpertPlacementScope), and the exchange that reaches the other shares.
  ExpertPlacement expert_placement() const;
  void set_expert_exchange(const std::shared_ptr<ExpertExchange>& exchange);

  // Aux-loss-free bias update of every MoE block (loads in moe_blocks() order, as ForwardOutput::expert_load).
  void update_routing_bias(const std::vector<torch::Tensor>& loads);

  // Initializes weights: normal(0, initializer_range), residual output projections scaled by 1/sqrt(2 L),
  // norms to one, the correction bias to zero. Deterministic given the global torch seed.
  void init_weights();

  // Recomputes each decoder layer in backward instead of storing its activations.
  void set_activation_checkpointing(bool on) { checkpointing_ = on; }

  // Fully sharded data parallelism (model/param_units.h): called around every unit's use; null (the default) for
  // none. The caller keeps `hooks` alive while the model runs, and unsets them before destroying them.
  void set_unit_hooks(UnitHooks* hooks) { unit_hooks_ = hooks; }

  const ModelConfig& config() const { return config_; }
  const RopeTable& rope() const { return rope_; }
  DeepSeekModel model{nullptr};
  Linear lm_head{nullptr};  // null when tie_word_embeddings (the head is the embedding)
  torch::nn::ModuleList mtp{nullptr};
  std::vector<MTPLayer> mtp_list;

private:
  torch::Tensor head(const torch::Tensor& h);
  // The head's weight when the fused head + loss can stand in for head() (ops fused, no adapter, no bias, not
  // quantized); undefined otherwise.
  torch::Tensor fused_head_weight() const;
  // Cross-entropy sum (and z-loss sum when z_loss) of the head over normed [B, T, hidden] against targets [B, T],
  // fused unless keep_logits (or the head cannot be fused); the unfused path stores its logits in *logits when
  // given.
  std::pair<torch::Tensor, torch::Tensor> head_loss(const torch::Tensor& normed, const torch::Tensor& targets,
                                                    bool z_loss, bool keep_logits, torch::Tensor* logits);
  LayerOutput run_layer(DecoderLayerImpl& layer, const torch::Tensor& h, const AttentionInput& in,
                        const torch::Tensor& token_mask);

  ModelConfig config_;
  RopeTable rope_;
  bool checkpointing_ = false;
  UnitHooks* unit_hooks_ = nullptr;
};
TORCH_MODULE(CausalLM);

}  // namespace dsopen::model
