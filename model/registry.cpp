// Flavors with the published hyperparameters of the DeepSeek family (docs/ARCHITECTURE.md "Published model sizes"), plus small ones for CPU work.
#include "model/registry.h"

#include <map>

namespace dsopen::model {

namespace {

ModelConfig deepseek_llm(int64_t layers, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t ffn) {
  ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 102400;
  c.hidden_size = hidden;
  c.intermediate_size = ffn;
  c.num_hidden_layers = layers;
  c.num_attention_heads = heads;
  c.num_key_value_heads = kv_heads;
  c.max_position_embeddings = 4096;
  c.rope_theta = 10000.0;
  c.bos_token_id = 100000;
  c.eos_token_id = {100001};
  return c;
}

RopeScaling yarn40(double mscale) {
  RopeScaling r;
  r.type = "yarn";
  r.factor = 40.0;
  r.original_max_position_embeddings = 4096;
  r.beta_fast = 32.0;
  r.beta_slow = 1.0;
  r.mscale = mscale;
  r.mscale_all_dim = mscale;
  return r;
}

ModelConfig mla_moe_base() {
  ModelConfig c;
  c.vocab_size = 102400;
  c.max_position_embeddings = 163840;
  c.kv_lora_rank = 512;
  c.qk_nope_head_dim = 128;
  c.qk_rope_head_dim = 64;
  c.v_head_dim = 128;
  c.bos_token_id = 100000;
  c.eos_token_id = {100001};
  c.first_k_dense_replace = 1;
  c.moe_layer_freq = 1;
  c.aux_loss_alpha = 0.001;
  return c;
}

ModelConfig v2_lite() {
  ModelConfig c = mla_moe_base();
  c.model_type = "deepseek_v2";
  c.hidden_size = 2048;
  c.intermediate_size = 10944;
  c.moe_intermediate_size = 1408;
  c.num_hidden_layers = 27;
  c.num_attention_heads = 16;
  c.num_key_value_heads = 16;
  c.q_lora_rank = 0;
  c.n_routed_experts = 64;
  c.n_shared_experts = 2;
  c.num_experts_per_tok = 6;
  c.routed_scaling_factor = 1.0;
  c.scoring_func = "softmax";
  c.topk_method = "greedy";
  c.rope_scaling = yarn40(0.707);
  return c;
}

ModelConfig v2() {
  ModelConfig c = mla_moe_base();
  c.model_type = "deepseek_v2";
  c.hidden_size = 5120;
  c.intermediate_size = 12288;
  c.moe_intermediate_size = 1536;
  c.num_hidden_layers = 60;
  c.num_attention_heads = 128;
  c.num_key_value_heads = 128;
  c.q_lora_rank = 1536;
  c.n_routed_experts = 160;
  c.n_shared_experts = 2;
  c.num_experts_per_tok = 6;
  c.routed_scaling_factor = 16.0;
  c.scoring_func = "softmax";
  c.topk_method = "group_limited_greedy";
  c.n_group = 8;
  c.topk_group = 3;
  c.rope_scaling = yarn40(0.707);
  return c;
}

ModelConfig v3() {
  ModelConfig c = mla_moe_base();
  c.model_type = "deepseek_v3";
  c.vocab_size = 129280;
  c.hidden_size = 7168;
  c.intermediate_size = 18432;
  c.moe_intermediate_size = 2048;
  c.num_hidden_layers = 61;
  c.num_attention_heads = 128;
  c.num_key_value_heads = 128;
  c.q_lora_rank = 1536;
  c.n_routed_experts = 256;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 8;
  c.first_k_dense_replace = 3;
  c.routed_scaling_factor = 2.5;
  c.scoring_func = "sigmoid";
  c.topk_method = "noaux_tc";
  c.n_group = 8;
  c.topk_group = 4;
  c.norm_topk_prob = true;
  c.aux_loss_alpha = 0.0001;
  c.num_nextn_predict_layers = 1;
  c.bos_token_id = 0;
  c.eos_token_id = {1};
  c.rope_scaling = yarn40(1.0);
  return c;
}

// A V3-shaped model small enough to train on two CPU cores: MLA with q_lora, 8 routed experts top-2 in 4 groups,
// one shared expert, sigmoid routing with the correction bias, and one MTP module.
ModelConfig tiny() {
  ModelConfig c;
  c.model_type = "deepseek_v3";
  c.vocab_size = 8000;
  c.hidden_size = 256;
  c.intermediate_size = 768;
  c.moe_intermediate_size = 256;
  c.num_hidden_layers = 4;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 4;
  c.max_position_embeddings = 1024;
  c.q_lora_rank = 96;
  c.kv_lora_rank = 64;
  c.qk_nope_head_dim = 32;
  c.qk_rope_head_dim = 16;
  c.v_head_dim = 32;
  c.n_routed_experts = 8;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 2;
  c.first_k_dense_replace = 1;
  c.routed_scaling_factor = 2.5;
  c.scoring_func = "sigmoid";
  c.topk_method = "noaux_tc";
  c.n_group = 4;
  c.topk_group = 2;
  c.norm_topk_prob = true;
  c.aux_loss_alpha = 0.0001;
  c.num_nextn_predict_layers = 1;
  c.use_mtp = true;
  c.bos_token_id = 1;
  c.eos_token_id = {2};
  c.pad_token_id = 0;
  return c;
}

// The smallest V3-shaped model, for unit tests.
ModelConfig debug() {
  ModelConfig c = tiny();
  c.vocab_size = 256;
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.moe_intermediate_size = 32;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 2;
  c.max_position_embeddings = 256;
  c.q_lora_rank = 32;
  c.kv_lora_rank = 16;
  c.qk_nope_head_dim = 16;
  c.qk_rope_head_dim = 8;
  c.v_head_dim = 16;
  c.pad_token_id = 0;
  return c;
}

// A dense Llama-style model of the tiny size (DeepSeek-LLM architecture).
ModelConfig tiny_dense() {
  ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 8000;
  c.hidden_size = 256;
  c.intermediate_size = 688;
  c.num_hidden_layers = 4;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 4;
  c.max_position_embeddings = 1024;
  c.bos_token_id = 1;
  c.eos_token_id = {2};
  c.pad_token_id = 0;
  return c;
}

// ---- The families users bring (published shapes; each flavor's config.json is the model's own) --------------

// Llama 3.1 8B: GQA 32/8, rope_theta 500k with llama3 scaling (factor 8 over an 8192 original context).
ModelConfig llama3_8b() {
  ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 128256;
  c.hidden_size = 4096;
  c.intermediate_size = 14336;
  c.num_hidden_layers = 32;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 8;
  c.max_position_embeddings = 131072;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500000.0;
  c.rope_scaling.type = "llama3";
  c.rope_scaling.factor = 8.0;
  c.rope_scaling.low_freq_factor = 1.0;
  c.rope_scaling.high_freq_factor = 4.0;
  c.rope_scaling.original_max_position_embeddings = 8192;
  c.bos_token_id = 128000;
  c.eos_token_id = {128001};
  return c;
}

// Llama 3.2 1B: tied embeddings, head_dim 64, llama3 scaling factor 32.
ModelConfig llama3_2_1b() {
  ModelConfig c = llama3_8b();
  c.hidden_size = 2048;
  c.intermediate_size = 8192;
  c.num_hidden_layers = 16;
  c.head_dim = 64;
  c.rope_scaling.factor = 32.0;
  c.tie_word_embeddings = true;
  return c;
}

// Qwen3-8B: q/k RMSNorm, head_dim 128, GQA 32/8.
ModelConfig qwen3_8b() {
  ModelConfig c;
  c.model_type = "qwen3";
  c.vocab_size = 151936;
  c.hidden_size = 4096;
  c.intermediate_size = 12288;
  c.num_hidden_layers = 36;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 8;
  c.head_dim = 128;
  c.max_position_embeddings = 40960;
  c.rope_theta = 1000000.0;
  c.bos_token_id = 151643;
  c.eos_token_id = {151645};
  return c;
}

// Qwen3-30B-A3B: 48 MoE layers, 128 experts top-8 (normalised), no shared expert.
ModelConfig qwen3_30b_a3b() {
  ModelConfig c = qwen3_8b();
  c.model_type = "qwen3_moe";
  c.hidden_size = 2048;
  c.intermediate_size = 6144;
  c.num_hidden_layers = 48;
  c.num_key_value_heads = 4;
  c.n_routed_experts = 128;
  c.num_experts_per_tok = 8;
  c.moe_intermediate_size = 768;
  c.norm_topk_prob = true;
  c.seq_aux = false;
  c.aux_loss_alpha = 0.001 * 8;  // router_aux_loss_coef 0.001 (see ModelConfig::to_hf_json)
  return c;
}

// Qwen1.5-MoE-A2.7B (qwen2_moe): 60 experts top-4 plus a gated shared expert, q/k/v biases.
ModelConfig qwen15_moe_a2_7b() {
  ModelConfig c;
  c.model_type = "qwen2_moe";
  c.vocab_size = 151936;
  c.hidden_size = 2048;
  c.intermediate_size = 5632;
  c.num_hidden_layers = 24;
  c.num_attention_heads = 16;
  c.num_key_value_heads = 16;
  c.max_position_embeddings = 8192;
  c.rope_theta = 1000000.0;
  c.attention_bias = true;
  c.n_routed_experts = 60;
  c.num_experts_per_tok = 4;
  c.moe_intermediate_size = 1408;
  c.shared_expert_intermediate_size = 5632;
  c.seq_aux = false;
  c.bos_token_id = 151643;
  c.eos_token_id = {151643};
  return c;
}

// GLM-4-9B-0414: GQA 32/2, rope on half of each 128-dim head (interleaved), fused gate_up_proj, post-norms.
ModelConfig glm4_9b() {
  ModelConfig c;
  c.model_type = "glm4";
  c.vocab_size = 151552;
  c.hidden_size = 4096;
  c.intermediate_size = 13696;
  c.num_hidden_layers = 40;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 2;
  c.head_dim = 128;
  c.partial_rotary_factor = 0.5;
  c.attention_bias = true;
  c.max_position_embeddings = 32768;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  c.pad_token_id = 151329;
  c.bos_token_id = 151331;
  c.eos_token_id = {151329, 151336, 151338};
  return c;
}

// Mixtral-8x7B: 8 experts top-2 in every layer, 32k context, rope_theta 1e6.
ModelConfig mixtral_8x7b() {
  ModelConfig c;
  c.model_type = "mixtral";
  c.vocab_size = 32000;
  c.hidden_size = 4096;
  c.intermediate_size = 14336;
  c.moe_intermediate_size = 14336;
  c.num_hidden_layers = 32;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 8;
  c.max_position_embeddings = 32768;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 1000000.0;
  c.n_routed_experts = 8;
  c.num_experts_per_tok = 2;
  c.norm_topk_prob = true;
  c.seq_aux = false;
  c.bos_token_id = 1;
  c.eos_token_id = {2};
  return c;
}

const std::map<std::string, ModelConfig>& registry() {
  static const std::map<std::string, ModelConfig> flavors = {
      {"debug", debug()},
      {"tiny", tiny()},
      {"tiny-dense", tiny_dense()},
      {"7b", deepseek_llm(30, 4096, 32, 32, 11008)},
      {"67b", deepseek_llm(95, 8192, 64, 8, 22016)},
      {"v2-lite", v2_lite()},
      {"v2", v2()},
      {"v3", v3()},
      {"llama3-8b", llama3_8b()},
      {"llama3.2-1b", llama3_2_1b()},
      {"qwen3-8b", qwen3_8b()},
      {"qwen3-30b-a3b", qwen3_30b_a3b()},
      {"qwen1.5-moe-a2.7b", qwen15_moe_a2_7b()},
      {"glm4-9b", glm4_9b()},
      {"mixtral-8x7b", mixtral_8x7b()},
  };
  return flavors;
}

}  // namespace

const ModelConfig* find_flavor(const std::string& name) {
  const auto& r = registry();
  auto it = r.find(name);
  return it == r.end() ? nullptr : &it->second;
}

std::vector<std::string> flavor_names() {
  std::vector<std::string> names;
  for (const auto& kv : registry()) names.push_back(kv.first);
  return names;
}

}  // namespace dsopen::model
