// Architecture traits: what each HF `model_type` is made of, decoded once from one table (model/arch.cpp).
// Layers, config I/O, counting and LoRA read these features and never compare model_type strings, so a new family
// whose components exist is one table entry (docs/ADDING_A_MODEL.md).
//
// The features follow transformers' modeling code for each family:
//   attention   MHA/GQA (q/k/v/o projections, optional per-head q/k RMSNorm, Qwen3) or MLA (DeepSeek-V2/V3)
//   biases      q/k/v and o_proj biases: never, always, or as the config's attention_bias (HF key per family)
//   rope        rotate-half pairs (i, i + d/2, Llama) or interleaved pairs (2i, 2i + 1, GLM, DeepSeek MLA), on the
//               first partial_rotary_factor of each head (GLM: half); scaling none/linear/dynamic/yarn/llama3 is
//               the config's rope_scaling (model/layers.h)
//   mlp         SwiGLU with separate gate_proj/up_proj or one fused gate_up_proj (GLM), or Mixtral's w1/w3/w2
//   norms       pre-norms, plus GLM-4's post_self_attn_layernorm and post_mlp_layernorm on each sub-block output
//   moe         where MoE layers sit, the router (softmax/sigmoid, greedy/group-limited/noaux_tc selection, how
//               the top-k weights are normalised and scaled), shared experts plain (DeepSeek) or behind their own
//               sigmoid gate (Qwen2-MoE), multi-token prediction (DeepSeek-V3)
#pragma once

#include <array>
#include <string>
#include <vector>

namespace dsopen::model {

struct ModelConfig;

enum class AttentionKind { kGQA, kMLA };       // kGQA covers MHA (kv heads = heads) and MQA
enum class BiasRule { kNever, kAlways, kConfig };  // kConfig: ModelConfig::attention_bias
enum class RopeLayout { kHalf, kInterleaved };
enum class MLPKind { kSeparate, kFusedGateUp };  // gate_proj + up_proj, or gate_up_proj [2I, h] (gate rows first)
enum class SharedExperts { kNone, kPlain, kGated };
// DeepSeek-V2: normalise the top-k weights when K > 1 and norm_topk_prob, *else* scale by routed_scaling_factor.
// DeepSeek-V3, Qwen-MoE, Mixtral: normalise when norm_topk_prob, *then* scale (by 1 where there is no factor).
enum class RoutingWeights { kNormalizeOrScale, kNormalizeThenScale };
// DeepSeek: layer >= first_k_dense_replace and layer % moe_layer_freq == 0. Qwen-MoE: (layer + 1) %
// decoder_sparse_step == 0 and layer not in mlp_only_layers. Mixtral: every layer.
enum class MoELayers { kDeepSeek, kQwen, kAll };

struct ArchTraits {
  std::string model_type;       // HF config.json model_type
  std::string hf_architecture;  // HF config.json architectures[0]
  AttentionKind attention = AttentionKind::kGQA;
  BiasRule qkv_bias = BiasRule::kConfig, o_bias = BiasRule::kConfig;
  std::string bias_key = "attention_bias";  // the HF key holding attention_bias ("": the family has none)
  bool qk_norm = false;                     // q_norm / k_norm: RMSNorm(head_dim) per head, before rope
  RopeLayout rope_layout = RopeLayout::kHalf;
  bool partial_rotary = false;       // honours partial_rotary_factor (transformers' Llama ignores it)
  bool rope_interleave_key = false;  // the layout is the config's rope_interleave (DeepSeek-V3 checkpoints)
  bool sliding_window_key = false;   // a non-null sliding_window switches windowed attention on (Mixtral)
  MLPKind mlp = MLPKind::kSeparate;
  bool post_norms = false;  // GLM-4
  // MoE (dense-only families have has_moe false).
  bool has_moe = false;
  std::string moe_block = "mlp";                                        // module name of a MoE layer's block
  std::array<std::string, 3> expert_proj = {"gate_proj", "up_proj", "down_proj"};  // gate, up, down
  SharedExperts shared = SharedExperts::kNone;
  RoutingWeights routing_weights = RoutingWeights::kNormalizeThenScale;
  MoELayers moe_layers = MoELayers::kDeepSeek;
  std::string experts_key = "n_routed_experts";  // HF key of the routed expert count
  bool expert_width_is_intermediate_size = false;  // Mixtral: experts are intermediate_size wide, no dense MLP
  bool always_normalize = false;  // top-k weights always sum to 1 (Mixtral: the format has no norm_topk_prob)
  bool deepseek_router = false;  // scoring_func / topk_method / groups / routed_scaling_factor are config keys
  bool correction_bias = false;  // e_score_correction_bias (noaux_tc selection, aux-loss-free balancing)
  bool mtp = false;              // multi-token prediction modules
  // Values transformers' config class gives the keys a file leaves out (applied before the file's keys are read).
  void (*defaults)(ModelConfig&) = nullptr;
};

// The traits of `model_type`; a usage error naming the known types for any other.
const ArchTraits& arch_traits(const std::string& model_type);
// Every supported model_type, in table order.
std::vector<std::string> model_types();

}  // namespace dsopen::model
