// ModelConfig: the hyperparameters of a DeepSeek-family model, with HuggingFace config.json key names, so a
// YAML `model:` section and an HF config.json are the same schema. Also validation, parameter and FLOP counts.
//
// Architectures (`model_type`, alias `architecture`; their features are in the table of model/arch.h):
//   llama        DeepSeek-LLM 7B/67B, Llama 2/3.x: MHA or GQA, SwiGLU, RoPE (rotate-half layout)
//   qwen2        as llama plus q/k/v biases
//   qwen3        as llama plus per-head q/k RMSNorm
//   glm, glm4    GLM-4: interleaved rope on half of each head, fused gate_up_proj, q/k/v biases; glm4 adds
//                post-norms on the attention and MLP outputs
//   deepseek_v2  MLA attention + DeepSeekMoE (softmax routing, greedy or group-limited greedy)
//   deepseek_v3  MLA + DeepSeekMoE with sigmoid routing, e_score_correction_bias (noaux_tc) and MTP
//   qwen2_moe    Qwen2 attention + softmax top-k MoE with a sigmoid-gated shared expert
//   qwen3_moe    Qwen3 attention + softmax top-k MoE
//   mixtral      Llama attention + softmax top-2 MoE in every layer (block_sparse_moe, experts w1/w3/w2)
#pragma once

#include <nlohmann/json.hpp>

#include "model/arch.h"

#include <cstdint>
#include <string>
#include <vector>

namespace dsopen::config {
class Reader;
}

namespace dsopen::model {

// rope_scaling / rope_parameters, as transformers' modeling_rope_utils reads them:
//   linear   inv_freq / factor (position interpolation)
//   dynamic  NTK-aware: for a forward pass reaching S > max_position_embeddings positions, the base becomes
//            theta * (factor * S / max_position_embeddings - (factor - 1))^(d / (d - 2)); positions reach
//            factor * max_position_embeddings
//   yarn     YaRN (Peng et al. 2023): per-dimension blend of interpolation and extrapolation, cos/sin scaled
//   llama3   Llama 3.1: wavelengths above original/low_freq_factor divided by factor, below
//            original/high_freq_factor kept, a smooth blend between
struct RopeScaling {
  std::string type;  // "" (none), "linear", "dynamic", "yarn" or "llama3"
  double factor = 1.0;
  double low_freq_factor = 1.0;   // llama3
  double high_freq_factor = 4.0;  // llama3
  int64_t original_max_position_embeddings = 4096;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 0.0;            // 0: absent (DeepSeek's reference then uses 1)
  double mscale_all_dim = 0.0;    // 0: absent
  double attention_factor = 0.0;  // cos/sin scale given explicitly; 0: derived from factor (and mscale)
  bool truncate = true;           // round the correction range to whole dimensions (transformers' default)
};

struct ModelConfig {
  std::string model_type = "deepseek_v3";
  std::string pretrained;  // HF directory the weights (and this config) come from; empty: random init
  bool strict = true;      // with pretrained: tensors the model does not have are errors (false: ignored)

  // Shared by all architectures.
  int64_t vocab_size = 32000;
  int64_t hidden_size = 256;
  int64_t intermediate_size = 688;  // dense SwiGLU width
  int64_t num_hidden_layers = 4;
  int64_t num_attention_heads = 4;
  int64_t num_key_value_heads = 4;  // MHA/GQA only
  int64_t head_dim = 0;             // MHA/GQA only; 0: hidden_size / num_attention_heads
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  double partial_rotary_factor = 1.0;  // MHA/GQA: rope on the first head_dim * factor dimensions (GLM: 0.5)
  bool attention_bias = false;  // which projections it biases is the architecture's (arch().qkv_bias / o_bias)
  bool tie_word_embeddings = false;
  double initializer_range = 0.02;
  int64_t bos_token_id = 1;
  std::vector<int64_t> eos_token_id = {2};  // HF allows one id or a list (Llama 3.1, DeepSeek); any of them ends a text
  int64_t pad_token_id = -1;  // -1: none

  // MLA (deepseek_v2 / deepseek_v3).
  int64_t q_lora_rank = 0;  // 0: no query compression (HF: null)
  int64_t kv_lora_rank = 512;
  int64_t qk_nope_head_dim = 128;
  int64_t qk_rope_head_dim = 64;
  int64_t v_head_dim = 128;
  // Layout of the rope dimensions: true = interleaved pairs (2i, 2i+1) as DeepSeek's checkpoints store q/k weights;
  // false = rotate-half pairs (i, i + d/2), for checkpoints whose weights were permuted (transformers
  // DeepseekV3Config.rope_interleave). deepseek_v3 only; V2 is always interleaved.
  bool rope_interleave = true;

  // DeepSeekMoE.
  int64_t n_routed_experts = 0;  // 0: dense model (HF: null)
  int64_t n_shared_experts = 0;
  int64_t moe_intermediate_size = 0;
  int64_t num_experts_per_tok = 0;
  int64_t first_k_dense_replace = 0;
  int64_t moe_layer_freq = 1;
  double routed_scaling_factor = 1.0;
  std::string scoring_func = "softmax";  // softmax | sigmoid
  std::string topk_method = "greedy";    // greedy | group_limited_greedy | noaux_tc
  int64_t n_group = 1;
  int64_t topk_group = 1;
  bool norm_topk_prob = false;
  double aux_loss_alpha = 0.0;  // sequence-wise balance loss coefficient (0 allowed)
  bool seq_aux = true;
  // Qwen-MoE / Mixtral.
  int64_t shared_expert_intermediate_size = 0;  // width of Qwen2-MoE's gated shared expert
  int64_t decoder_sparse_step = 1;              // Qwen-MoE: layer l is MoE when (l + 1) % step == 0 ...
  std::vector<int64_t> mlp_only_layers;         // ... and l is not listed here
  double router_jitter_noise = 0.0;             // Mixtral: training multiplies MoE inputs by U(1 - j, 1 + j)
  // transformers' balance-loss coefficient, kept for export while output_router_logits is off (aux_loss_alpha 0).
  double router_aux_loss_coef = 0.001;

  // Multi-token prediction (V3). The modules exist only when use_mtp is true.
  int64_t num_nextn_predict_layers = 0;

  // Extensions (not in HF config.json): training-time behaviour of the model.
  bool use_mtp = false;
  double mtp_loss_weight = 0.3;       // lambda
  double bias_update_speed = 0.001;   // aux-loss-free balancing step (gamma)
  // Training only: each routed expert takes at most ceil(capacity_factor * tokens * top_k / n_routed_experts) of a
  // forward pass's token copies, those with the highest routing weight (GShard / Switch "token dropping"); the others
  // skip that expert. 0: no token is ever dropped (DeepSeek-V3's choice).
  double capacity_factor = 0.0;
  double z_loss_coef = 0.0;           // coefficient of mean(logsumexp^2)
  bool scaled_residual_init = true;   // o_proj/down_proj std divided by sqrt(2 * layers)

  // ---- derived ----
  const ArchTraits& arch() const { return arch_traits(model_type); }
  bool is_mla() const { return arch().attention == AttentionKind::kMLA; }
  bool is_moe_layer(int64_t layer) const;
  int64_t attn_head_dim() const { return head_dim > 0 ? head_dim : hidden_size / num_attention_heads; }
  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  // Rotary dimensions per head: MLA's decoupled rope key, else the first partial_rotary_factor of the head
  // (truncated, as transformers' int(head_dim * factor)).
  int64_t rope_dim() const;
  bool qkv_bias() const;
  bool o_bias() const;
  // Positions a sequence may reach: max_position_embeddings, times the factor under dynamic NTK scaling.
  int64_t context_length() const;
  int64_t mtp_depth() const { return use_mtp ? num_nextn_predict_layers : 0; }

  // Throws a usage error listing every inconsistency, each naming its key (`where` prefixes the messages).
  void validate(const std::string& where = "model") const;

  // HF config.json (architectures, model_type and every key transformers reads for this architecture).
  nlohmann::json to_hf_json() const;
  // Reads an HF config.json. Keys that change the math are read, and values we do not implement are refused by
  // name; keys we do not know are logged as a warning (they usually belong to other tools).
  static ModelConfig from_hf_json_file(const std::string& path);
};

// Decodes a YAML/JSON `model:` mapping: `flavor:` starts from a registered flavor, explicit keys override it.
// `strict` rejects unknown keys (YAML configs); HF config.json files are read non-strictly.
void decode(config::Reader& reader, ModelConfig& out, bool strict = true);

// Parameter and FLOP accounting (DeepSeek's convention: totals include embedding and head; active parameters
// are those a token uses — attention, dense layers, shared + top-k routed experts, head — without the embedding
// table, which is a lookup).
struct ParamCounts {
  int64_t total = 0;
  int64_t active = 0;
  int64_t embedding = 0;
  int64_t mtp = 0;  // parameters of MTP modules (included in total only when use_mtp)
  int64_t routed = 0;  // routed-expert parameters within total (what expert parallelism shards)
  // The most parameters one ZeRO-3 unit (model/param_units.h) makes whole at once: the embedding, a decoder layer,
  // the head (with tied embeddings the embedding's) or an MTP module.
  int64_t largest_unit = 0;
  int64_t largest_layer = 0;  // of those, the largest decoder layer or MTP module
};
ParamCounts count_parameters(const ModelConfig& c);

// Training FLOPs per token at sequence length `seq_len`: 6 * active (matmul) params + the attention term
// 6 * layers * heads * (qk_dim + v_dim) * seq_len / 2 (causal), as in the PaLM/Chinchilla MFU convention.
double training_flops_per_token(const ModelConfig& c, int64_t seq_len);

// Bytes of KV cache per token for all layers at `bytes_per_element` (2 for bf16): MLA stores the latent and the
// rope key only; MHA/GQA store K and V for every KV head.
int64_t kv_cache_bytes_per_token(const ModelConfig& c, int64_t bytes_per_element = 2);

}  // namespace dsopen::model
