// The architecture table: one entry per HF model_type, read from transformers' modeling_<family>.py and
// configuration_<family>.py. The only place that knows families by name.
#include "model/arch.h"

#include "model/config.h"
#include "utils/config.h"
#include "utils/errors.h"

namespace dsopen::model {

namespace {

// Qwen-MoE and Mixtral: softmax greedy routing, weights unscaled, the balance loss over the batch (Switch
// Transformer's form, which transformers adds when output_router_logits is set).
void moe_defaults(ModelConfig& c) {
  c.scoring_func = "softmax";
  c.topk_method = "greedy";
  c.n_group = c.topk_group = 1;
  c.routed_scaling_factor = 1.0;
  c.first_k_dense_replace = 0;
  c.norm_topk_prob = false;
  c.aux_loss_alpha = 0.0;
  c.seq_aux = false;
}

std::vector<ArchTraits> build_table() {
  std::vector<ArchTraits> t;

  // DeepSeek-LLM 7B/67B, Llama 2/3.x: rotate-half rope, biases on all four projections when attention_bias.
  ArchTraits llama;
  llama.model_type = "llama";
  llama.hf_architecture = "LlamaForCausalLM";
  t.push_back(llama);

  // Qwen2 / Qwen2.5: q/k/v always biased, o_proj never.
  ArchTraits qwen2 = llama;
  qwen2.model_type = "qwen2";
  qwen2.hf_architecture = "Qwen2ForCausalLM";
  qwen2.qkv_bias = BiasRule::kAlways;
  qwen2.o_bias = BiasRule::kNever;
  t.push_back(qwen2);

  // Qwen3: per-head q/k RMSNorm before rope; attention_bias on all four projections.
  ArchTraits qwen3 = llama;
  qwen3.model_type = "qwen3";
  qwen3.hf_architecture = "Qwen3ForCausalLM";
  qwen3.qk_norm = true;
  qwen3.defaults = [](ModelConfig& c) { c.head_dim = 128; };
  t.push_back(qwen3);

  // GLM (GLM-4 0414's predecessor in transformers, `glm`): interleaved rope on half of each head, fused gate_up_proj,
  // q/k/v biases (attention_bias, default true), o_proj without.
  ArchTraits glm = llama;
  glm.model_type = "glm";
  glm.hf_architecture = "GlmForCausalLM";
  glm.o_bias = BiasRule::kNever;
  glm.rope_layout = RopeLayout::kInterleaved;
  glm.partial_rotary = true;
  glm.mlp = MLPKind::kFusedGateUp;
  glm.defaults = [](ModelConfig& c) {
    c.attention_bias = true;
    c.partial_rotary_factor = 0.5;
    c.head_dim = 128;
  };
  t.push_back(glm);

  // GLM-4 (0414): GLM plus a norm on each sub-block's output before the residual add.
  ArchTraits glm4 = glm;
  glm4.model_type = "glm4";
  glm4.hf_architecture = "Glm4ForCausalLM";
  glm4.post_norms = true;
  t.push_back(glm4);

  // DeepSeek-V2: MLA, DeepSeekMoE with plain shared experts; top-k weights normalised *or* scaled.
  ArchTraits v2;
  v2.model_type = "deepseek_v2";
  v2.hf_architecture = "DeepseekV2ForCausalLM";
  v2.attention = AttentionKind::kMLA;
  v2.qkv_bias = v2.o_bias = BiasRule::kNever;
  v2.rope_layout = RopeLayout::kInterleaved;
  v2.has_moe = true;
  v2.shared = SharedExperts::kPlain;
  v2.routing_weights = RoutingWeights::kNormalizeOrScale;
  v2.deepseek_router = true;
  t.push_back(v2);

  // DeepSeek-V3: V2 plus sigmoid scores with e_score_correction_bias (noaux_tc) and multi-token prediction.
  ArchTraits v3 = v2;
  v3.model_type = "deepseek_v3";
  v3.hf_architecture = "DeepseekV3ForCausalLM";
  v3.routing_weights = RoutingWeights::kNormalizeThenScale;
  v3.correction_bias = true;
  v3.rope_interleave_key = true;
  v3.mtp = true;
  v3.defaults = [](ModelConfig& c) {
    // DeepSeek-V3 config.json files (and transformers' DeepseekV3Config) leave these out: V3 routing is implied.
    c.scoring_func = "sigmoid";
    c.topk_method = "noaux_tc";
  };
  t.push_back(v3);

  // Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): softmax top-k over num_experts, one shared expert behind its own
  // sigmoid gate, q/k/v biases under the key qkv_bias (default true).
  ArchTraits qwen2_moe = qwen2;
  qwen2_moe.model_type = "qwen2_moe";
  qwen2_moe.hf_architecture = "Qwen2MoeForCausalLM";
  qwen2_moe.qkv_bias = BiasRule::kConfig;
  qwen2_moe.bias_key = "qkv_bias";
  qwen2_moe.has_moe = true;
  qwen2_moe.shared = SharedExperts::kGated;
  qwen2_moe.moe_layers = MoELayers::kQwen;
  qwen2_moe.experts_key = "num_experts";
  qwen2_moe.defaults = [](ModelConfig& c) {
    c.attention_bias = true;
    moe_defaults(c);
  };
  t.push_back(qwen2_moe);

  // Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B): Qwen3 attention, softmax top-k, no shared expert.
  ArchTraits qwen3_moe = qwen3;
  qwen3_moe.model_type = "qwen3_moe";
  qwen3_moe.hf_architecture = "Qwen3MoeForCausalLM";
  qwen3_moe.has_moe = true;
  qwen3_moe.moe_layers = MoELayers::kQwen;
  qwen3_moe.experts_key = "num_experts";
  qwen3_moe.defaults = moe_defaults;
  t.push_back(qwen3_moe);

  // Mixtral: every layer a softmax top-k MoE (always normalised) under block_sparse_moe, experts w1 (gate),
  // w3 (up), w2 (down) intermediate_size wide; no biases.
  ArchTraits mixtral = llama;
  mixtral.model_type = "mixtral";
  mixtral.hf_architecture = "MixtralForCausalLM";
  mixtral.qkv_bias = mixtral.o_bias = BiasRule::kNever;
  mixtral.bias_key = "";
  mixtral.has_moe = true;
  mixtral.moe_block = "block_sparse_moe";
  mixtral.expert_proj = {"w1", "w3", "w2"};
  mixtral.moe_layers = MoELayers::kAll;
  mixtral.experts_key = "num_local_experts";
  mixtral.expert_width_is_intermediate_size = true;
  mixtral.always_normalize = true;
  mixtral.sliding_window_key = true;
  mixtral.defaults = [](ModelConfig& c) {
    moe_defaults(c);
    c.norm_topk_prob = true;
    c.n_routed_experts = 8;
    c.num_experts_per_tok = 2;
  };
  t.push_back(mixtral);
  return t;
}

const std::vector<ArchTraits>& table() {
  static const std::vector<ArchTraits> t = build_table();
  return t;
}

}  // namespace

const ArchTraits& arch_traits(const std::string& model_type) {
  for (const auto& a : table())
    if (a.model_type == model_type) return a;
  std::string names;
  for (const auto& a : table()) names += (names.empty() ? "" : ", ") + a.model_type;
  const std::string guess = config::closest_match(model_type, model_types());
  throw usage_error("model_type", "'" + model_type + "' is not a supported architecture (known: " + names + ")" +
                                      (guess.empty() ? "" : " (did you mean '" + guess + "'?)"));
}

std::vector<std::string> model_types() {
  std::vector<std::string> out;
  for (const auto& a : table()) out.push_back(a.model_type);
  return out;
}

}  // namespace dsopen::model
