#include "model/config.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <filesystem>

#include "model/registry.h"
#include "utils/config.h"
#include "utils/errors.h"
#include "utils/json.h"
#include "utils/env.h"

#include <spdlog/spdlog.h>

namespace dsopen::model {

namespace {

// HF writes `null` for "absent" ranks and expert counts; we store 0.
void nullable_int(config::Reader& r, const std::string& key, int64_t& out) {
  if (r.has(key) && r.raw(key).IsNull()) {
    out = 0;
    return;
  }
  long long v = out;
  r.optional(key, v, config::at_least(0));
  out = v;
}

// HF writes one id, a list of ids (any of them ends generation) or null.
void token_id_list(config::Reader& r, const std::string& key, std::vector<int64_t>& out) {
  if (!r.has(key)) return;
  const YAML::Node node = r.raw(key);
  out.clear();
  if (node.IsNull()) return;
  auto one = [&](const YAML::Node& n) {
    try {
      const long long v = n.as<long long>();
      if (v < 0) throw YAML::Exception(n.Mark(), "negative");
      out.push_back(v);
    } catch (const YAML::Exception&) {
      r.error(key, "expected a token id (an integer >= 0) or a list of them");
    }
  };
  if (node.IsSequence()) {
    for (const auto& n : node) one(n);
  } else {
    one(node);
  }
}

// Families whose modeling code rotates whole heads (transformers ignores the key for them, or fails on it).
void refuse_partial_rotary(config::Reader& r, const ArchTraits& arch) {
  r.error("partial_rotary_factor", arch.model_type + " rotates whole heads (its transformers model does not apply "
                                       "partial_rotary_factor); remove the key");
}

// rope_scaling (transformers 4) or rope_parameters (transformers 5): the rope type and its parameters, read as
// transformers' modeling_rope_utils reads them. `theta` and `partial` receive a rope_theta and a
// partial_rotary_factor given inside.
void decode_rope_scaling(config::Reader& parent, const std::string& key, RopeScaling& out, double& theta,
                         double& partial, const ArchTraits& arch, int64_t max_positions, bool strict) {
  if (!parent.has(key)) return;
  const YAML::Node node = parent.raw(key);
  if (node.IsNull()) {
    out = RopeScaling{};
    return;
  }
  if (!node.IsMap()) {
    parent.error(key, "expected a mapping of rope parameters (or null)");
    return;
  }
  config::Reader r = parent.child(key);
  std::string type = out.type.empty() ? "default" : out.type;
  // transformers reads rope_type; `type` is its older spelling. Two different values would mean two models.
  std::string rope_type, legacy;
  r.optional("rope_type", rope_type);
  r.optional("type", legacy);
  if (!rope_type.empty() && !legacy.empty() && rope_type != legacy)
    r.error("type", "is '" + legacy + "' but rope_type is '" + rope_type + "'; keep one");
  if (!rope_type.empty()) type = rope_type;
  else if (!legacy.empty()) type = legacy;
  static const std::vector<std::string> known = {"default", "none", "linear", "dynamic", "yarn", "llama3"};
  if (std::find(known.begin(), known.end(), type) == known.end())
    r.error(r.has("rope_type") ? "rope_type" : "type",
            "rope scaling '" + type + "' is not supported (use linear, dynamic, yarn or llama3, or remove " + key + ")");
  out.type = (type == "default" || type == "none") ? "" : type;
  const bool typed = r.has("rope_type") || r.has("type");
  if (typed && !out.type.empty()) {
    // transformers fails (KeyError) when these keys are absent: refuse rather than assume a value.
    std::vector<std::string> required;
    if (out.type != "yarn") required.push_back("factor");
    if (out.type == "llama3") required.insert(required.end(), {"low_freq_factor", "high_freq_factor"});
    for (const auto& k : required)
      if (!r.has(k)) r.error(k, "is required by rope type " + out.type + " (transformers reads it)");
  }
  // An HF file's mapping is read as transformers reads it: the original context defaults to max_position_embeddings
  // and YaRN's factor to their ratio (a YAML mapping keeps what it does not mention).
  const bool fill = typed && !strict && (out.type == "yarn" || out.type == "llama3");
  if (fill && !r.has("original_max_position_embeddings")) out.original_max_position_embeddings = max_positions;
  r.optional("factor", out.factor, config::at_least_f(1.0));
  long long orig = out.original_max_position_embeddings;
  r.optional("original_max_position_embeddings", orig, config::at_least(1));
  out.original_max_position_embeddings = orig;
  if (fill && out.type == "yarn" && !r.has("factor"))
    out.factor = static_cast<double>(max_positions) / static_cast<double>(out.original_max_position_embeddings);
  r.optional("beta_fast", out.beta_fast, config::greater_than(0));
  r.optional("beta_slow", out.beta_slow, config::greater_than(0));
  r.optional("mscale", out.mscale, config::at_least_f(0));
  r.optional("mscale_all_dim", out.mscale_all_dim, config::at_least_f(0));
  r.optional("attention_factor", out.attention_factor, config::greater_than(0));
  r.optional("truncate", out.truncate);
  r.optional("low_freq_factor", out.low_freq_factor, config::greater_than(0));
  r.optional("high_freq_factor", out.high_freq_factor, config::greater_than(0));
  r.optional("rope_theta", theta, config::greater_than(0));
  r.optional("partial_rotary_factor", partial, config::greater_than(0));
  if (partial != 1.0 && !arch.partial_rotary) refuse_partial_rotary(r, arch);
  if (arch.attention != AttentionKind::kMLA && out.type == "yarn" && (out.mscale > 0) != (out.mscale_all_dim > 0))
    r.error(out.mscale > 0 ? "mscale" : "mscale_all_dim",
            "transformers uses mscale only together with mscale_all_dim (one alone is ignored); give both or neither");
  r.finish(strict);
}

// A key that transformers spells differently per family (the routed expert count): every spelling given must agree.
void aliased_int(config::Reader& r, const std::vector<const char*>& keys, int64_t& out) {
  const char* first = nullptr;
  for (const char* k : keys) {
    if (!r.has(k)) continue;
    int64_t v = out;
    nullable_int(r, k, v);
    if (first && v != out)
      r.error(k, "is " + std::to_string(v) + " but " + first + " is " + std::to_string(out) + "; keep one of the two");
    if (!first) first = k;
    out = v;
  }
}

// HF keys that change the math: each one is implemented for the values real checkpoints use, and any other value
// is refused by name (accepting it and computing something else would give silently wrong logits).
void decode_math_keys(config::Reader& r, ModelConfig& c) {
  const ArchTraits& a = c.arch();
  const bool interleaved = a.rope_layout == RopeLayout::kInterleaved;
  if (r.has("rope_interleave") && !r.raw("rope_interleave").IsNull()) {
    bool interleave = c.rope_interleave;
    r.optional("rope_interleave", interleave);
    if (a.rope_interleave_key) c.rope_interleave = interleave;
    else if (interleave != interleaved)
      r.error("rope_interleave", interleaved ? c.model_type + " always uses the interleaved rope layout (transformers "
                                                              "ignores this key); remove it"
                                             : c.model_type + " uses the rotate-half rope layout; remove rope_interleave: true");
  } else {
    r.accept("rope_interleave");
  }
  bool mlp_bias = false;
  r.optional("mlp_bias", mlp_bias);
  if (mlp_bias) r.error("mlp_bias", "biases on gate/up/down projections are not supported; remove the key or set it false");
  if (c.is_mla() && c.attention_bias)
    r.error("attention_bias", "biases on MLA projections (q_a_proj, kv_a_proj_with_mqa, o_proj) are not supported");
  if (r.has("qk_head_dim") && !r.raw("qk_head_dim").IsNull()) {
    long long qk = 0;
    r.optional("qk_head_dim", qk);
    if (qk != c.qk_head_dim())
      r.error("qk_head_dim", "is " + std::to_string(qk) + " but qk_nope_head_dim + qk_rope_head_dim = " +
                                 std::to_string(c.qk_head_dim()));
  }
  if (r.has("num_experts_per_token") && !r.raw("num_experts_per_token").IsNull()) {
    long long k = 0;
    r.optional("num_experts_per_token", k);
    if (k != c.num_experts_per_tok)
      r.error("num_experts_per_token", "is " + std::to_string(k) + " but num_experts_per_tok is " +
                                           std::to_string(c.num_experts_per_tok) + "; keep one of the two");
  }
  // pretraining_tp > 1 split the matmuls of transformers 4.x into slices with the same result; 5.x ignores it.
  r.accept("pretraining_tp");
  // Qwen2's sliding-window attention: inert unless switched on.
  bool sliding = false;
  r.optional("use_sliding_window", sliding);
  if (sliding)
    r.error("use_sliding_window", "sliding-window attention is not supported; set it false (full attention)");
  if (r.has("layer_types") && r.raw("layer_types").IsSequence())
    for (const auto& t : r.raw("layer_types"))
      if (!t.IsScalar() || t.Scalar() != "full_attention") {
        r.error("layer_types", "only full_attention layers are supported, found '" +
                                   (t.IsScalar() ? t.Scalar() : std::string("?")) + "'");
        break;
      }
  r.accept("layer_types");
  // Mixtral windows attention whenever sliding_window is set; a window covering the whole context changes nothing.
  if (a.sliding_window_key && r.has("sliding_window") && !r.raw("sliding_window").IsNull()) {
    long long window = std::numeric_limits<long long>::max();  // kept when the value is not a number (reported)
    r.optional("sliding_window", window);
    if (window < c.context_length())
      r.error("sliding_window", "sliding-window attention (" + std::to_string(window) +
                                    " positions) is not supported; set it to null (full attention)");
  }
  r.accept("sliding_window");
  r.accept("max_window_layers");
  // Quantized weights: the GPTQ layout (and dsopen-quantize's earlier rtn/gptq layout) are checked tensor by tensor
  // by the quantized loader (inference/quantized_format.h); other methods (fp8 blocks, awq, bitsandbytes, ...) are
  // refused here.
  if (r.has("quantization_config") && !r.raw("quantization_config").IsNull()) {
    const YAML::Node q = r.raw("quantization_config");
    const std::string method = q.IsMap() && q["quant_method"] && q["quant_method"].IsScalar() ? q["quant_method"].Scalar() : "?";
    if (method != "rtn" && method != "gptq")
      r.error("quantization_config", "the weights are quantized (quant_method " + method +
                                         "), which dsopen does not load; convert them to bf16 first, or quantize "
                                         "with dsopen-quantize");
  }
  r.accept("quantization_config");
}

}  // namespace

void decode(config::Reader& r, ModelConfig& c, bool strict) {
  // A flavor gives the starting point; every other key overrides it.
  std::string flavor;
  r.optional("flavor", flavor);
  if (!flavor.empty()) {
    if (const ModelConfig* f = find_flavor(flavor)) {
      c = *f;
    } else {
      std::string names;
      for (const auto& n : flavor_names()) names += (names.empty() ? "" : ", ") + n;
      const std::string guess = config::closest_match(flavor, flavor_names());
      r.error("flavor", "unknown flavor '" + flavor + "' (known: " + names + ")" +
                            (guess.empty() ? "" : " (did you mean '" + guess + "'?)"));
    }
  }
  const std::vector<std::string> types = model_types();
  std::string type = c.model_type;
  r.choice("architecture", type, types);
  r.choice("model_type", type, types);
  c.model_type = type;
  // A config built from scratch (or an HF file) starts from the defaults transformers' config class gives the
  // family; one built on a flavor or on a pretrained directory's config keeps those.
  if (flavor.empty() && !r.has("pretrained") && c.arch().defaults) c.arch().defaults(c);
  r.optional("pretrained", c.pretrained);
  r.optional("strict", c.strict);

  auto i64 = [&](const char* key, int64_t& out, long long lo) {
    long long v = out;
    r.optional(key, v, config::at_least(lo));
    out = v;
  };
  i64("vocab_size", c.vocab_size, 1);
  i64("hidden_size", c.hidden_size, 1);
  i64("intermediate_size", c.intermediate_size, 1);
  i64("num_hidden_layers", c.num_hidden_layers, 1);
  i64("num_attention_heads", c.num_attention_heads, 1);
  i64("num_key_value_heads", c.num_key_value_heads, 1);
  nullable_int(r, "head_dim", c.head_dim);
  i64("max_position_embeddings", c.max_position_embeddings, 1);
  r.optional("rms_norm_eps", c.rms_norm_eps, config::greater_than(0));
  r.optional("rope_theta", c.rope_theta, config::greater_than(0));
  // Two rope sections would be read differently by different transformers versions: one is the model's.
  const bool has_rs = r.has("rope_scaling") && !r.raw("rope_scaling").IsNull();
  const bool has_rp = r.has("rope_parameters") && !r.raw("rope_parameters").IsNull();
  if (has_rs && has_rp) r.error("rope_parameters", "given together with rope_scaling; keep one of the two");
  r.optional("partial_rotary_factor", c.partial_rotary_factor, config::greater_than(0));
  if (r.has("partial_rotary_factor") && c.partial_rotary_factor != 1.0 && !c.arch().partial_rotary)
    refuse_partial_rotary(r, c.arch());
  decode_rope_scaling(r, "rope_scaling", c.rope_scaling, c.rope_theta, c.partial_rotary_factor, c.arch(),
                      c.max_position_embeddings, strict);
  decode_rope_scaling(r, "rope_parameters", c.rope_scaling, c.rope_theta, c.partial_rotary_factor, c.arch(),
                      c.max_position_embeddings, strict);  // transformers >= 5
  // The family's key for its attention biases (Qwen2-MoE: qkv_bias); attention_bias is always ours in YAML.
  r.optional("attention_bias", c.attention_bias);
  if (!c.arch().bias_key.empty() && c.arch().bias_key != "attention_bias") r.optional(c.arch().bias_key, c.attention_bias);
  r.optional("tie_word_embeddings", c.tie_word_embeddings);
  r.optional("initializer_range", c.initializer_range, config::greater_than(0));
  nullable_int(r, "bos_token_id", c.bos_token_id);
  token_id_list(r, "eos_token_id", c.eos_token_id);
  if (r.has("pad_token_id") && r.raw("pad_token_id").IsNull()) c.pad_token_id = -1;
  else i64("pad_token_id", c.pad_token_id, -1);

  nullable_int(r, "q_lora_rank", c.q_lora_rank);
  i64("kv_lora_rank", c.kv_lora_rank, 1);
  i64("qk_nope_head_dim", c.qk_nope_head_dim, 1);
  i64("qk_rope_head_dim", c.qk_rope_head_dim, 2);
  i64("v_head_dim", c.v_head_dim, 1);

  aliased_int(r, {"n_routed_experts", "num_experts", "num_local_experts"}, c.n_routed_experts);
  nullable_int(r, "n_shared_experts", c.n_shared_experts);
  nullable_int(r, "moe_intermediate_size", c.moe_intermediate_size);
  nullable_int(r, "num_experts_per_tok", c.num_experts_per_tok);
  i64("first_k_dense_replace", c.first_k_dense_replace, 0);
  i64("moe_layer_freq", c.moe_layer_freq, 1);
  r.optional("routed_scaling_factor", c.routed_scaling_factor, config::greater_than(0));
  r.choice("scoring_func", c.scoring_func, {"softmax", "sigmoid"});
  r.choice("topk_method", c.topk_method, {"greedy", "group_limited_greedy", "noaux_tc"});
  nullable_int(r, "n_group", c.n_group);
  nullable_int(r, "topk_group", c.topk_group);
  r.optional("norm_topk_prob", c.norm_topk_prob);
  r.optional("aux_loss_alpha", c.aux_loss_alpha, config::at_least_f(0));
  r.optional("seq_aux", c.seq_aux);
  nullable_int(r, "num_nextn_predict_layers", c.num_nextn_predict_layers);
  nullable_int(r, "shared_expert_intermediate_size", c.shared_expert_intermediate_size);
  i64("decoder_sparse_step", c.decoder_sparse_step, 1);
  if (r.has("mlp_only_layers") && !r.raw("mlp_only_layers").IsNull()) {
    const YAML::Node list = r.raw("mlp_only_layers");
    c.mlp_only_layers.clear();
    try {
      if (!list.IsSequence()) throw YAML::Exception(list.Mark(), "not a list");
      for (const auto& n : list) {
        if (n.Tag() == "!") throw YAML::Exception(n.Mark(), "quoted");  // "0" is a string, as transformers sees it
        c.mlp_only_layers.push_back(n.as<long long>());
      }
    } catch (const YAML::Exception&) {
      r.error("mlp_only_layers", "expected a list of layer indices");
    }
  }
  r.accept("mlp_only_layers");
  r.optional("router_jitter_noise", c.router_jitter_noise, config::at_least_f(0));
  if (c.arch().expert_width_is_intermediate_size) c.moe_intermediate_size = c.intermediate_size;
  // transformers' Switch-style balance loss (Qwen-MoE, Mixtral): added when output_router_logits is set, as
  // router_aux_loss_coef * E * sum_e (fraction routed to e) * (mean probability of e). Ours over the batch
  // (seq_aux false) is aux_loss_alpha * E/K * the same sum, so alpha = coef * K.
  if (!c.arch().deepseek_router && (r.has("router_aux_loss_coef") || r.has("output_router_logits"))) {
    bool on = false;
    r.optional("router_aux_loss_coef", c.router_aux_loss_coef, config::at_least_f(0));
    r.optional("output_router_logits", on);
    c.aux_loss_alpha = on ? c.router_aux_loss_coef * static_cast<double>(std::max<int64_t>(c.num_experts_per_tok, 1)) : 0.0;
  }

  r.optional("use_mtp", c.use_mtp);
  r.optional("mtp_loss_weight", c.mtp_loss_weight, config::at_least_f(0));
  r.optional("bias_update_speed", c.bias_update_speed, config::at_least_f(0));
  r.optional("capacity_factor", c.capacity_factor, config::at_least_f(0));
  r.optional("z_loss_coef", c.z_loss_coef, config::at_least_f(0));
  r.optional("scaled_residual_init", c.scaled_residual_init);

  // HF keys with only one supported value.
  std::string act = "silu";
  r.optional("hidden_act", act);
  if (act != "silu") r.error("hidden_act", "only 'silu' (SwiGLU) is supported, got '" + act + "'");
  double dropout = 0.0;
  r.optional("attention_dropout", dropout);
  if (dropout != 0.0) r.error("attention_dropout", "attention dropout is not supported; set it to 0");
  decode_math_keys(r, c);
  if (!strict && c.arch().correction_bias) {
    // An HF file is read as transformers reads it: DeepseekV3 always routes with sigmoid scores and the
    // bias-corrected, group-limited selection (DeepSeek's own code refuses anything else). A YAML config may
    // combine them freely.
    if (c.scoring_func != "sigmoid")
      r.error("scoring_func", "deepseek_v3 checkpoints route with sigmoid scores; '" + c.scoring_func +
                                  "' would give other logits than transformers and DeepSeek's code");
    if (c.topk_method != "noaux_tc")
      r.error("topk_method", "deepseek_v3 checkpoints select experts with noaux_tc; '" + c.topk_method +
                                 "' would give other logits than transformers and DeepSeek's code");
  }
  // Keys with no effect on the model: bookkeeping of transformers and of the files' authors, parallel layouts
  // (ep_size), and generation defaults (read by the generation config, see inference/generation_config.h).
  for (const char* k : {"architectures", "torch_dtype", "dtype", "transformers_version", "use_cache", "_name_or_path",
                        "auto_map", "ep_size", "output_attentions", "output_hidden_states", "return_dict", "id2label",
                        "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
                        "tokenizer_class", "task_specific_params", "torchscript", "output_router_logits",
                        "router_aux_loss_coef", "max_length", "min_length", "do_sample", "temperature", "top_k", "top_p",
                        "num_beams", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
                        "early_stopping", "decoder_start_token_id", "sep_token_id", "num_return_sequences"})
    r.accept(k);
  if (!strict) {
    // An HF file may carry keys of tools we do not know; say which were not read rather than drop them silently.
    const auto unread = r.unread();
    if (!unread.empty()) {
      std::string names;
      for (const auto& k : unread) names += (names.empty() ? "" : ", ") + k;
      spdlog::warn("{}: keys not read (they change nothing in the {} architecture as dsopen implements it): {}",
                   r.path().empty() ? "config" : r.path(), c.model_type, names);
    }
  }
  r.finish(strict);
}

void ModelConfig::validate(const std::string& where) const {
  std::vector<std::string> errs;
  // `where` is a config section ("model" -> model.hidden_size) or a file (config.json: hidden_size).
  const bool file = where.size() > 5 && where.compare(where.size() - 5, 5, ".json") == 0;
  auto bad = [&](const std::string& key, const std::string& msg) {
    errs.push_back(where + (file ? ": " : ".") + key + ": " + msg);
  };
  const ArchTraits& a = arch();
  if (!is_mla()) {
    if (head_dim == 0 && hidden_size % num_attention_heads != 0)
      bad("num_attention_heads", "must divide hidden_size (" + std::to_string(hidden_size) + ")");
    if (num_attention_heads % num_key_value_heads != 0)
      bad("num_key_value_heads", "must divide num_attention_heads (" + std::to_string(num_attention_heads) + ")");
    if (partial_rotary_factor > 1.0) bad("partial_rotary_factor", "must be in (0, 1]");
    else if (partial_rotary_factor != 1.0 && !a.partial_rotary)
      bad("partial_rotary_factor", model_type + " rotates whole heads; remove the key");
    else if (rope_dim() < 2 || rope_dim() % 2 != 0)
      bad(partial_rotary_factor < 1.0 ? "partial_rotary_factor" : "head_dim",
          "gives " + std::to_string(rope_dim()) + " rotary dimensions; they must be even and >= 2");
  } else {
    if (qk_rope_head_dim % 2 != 0) bad("qk_rope_head_dim", "must be even for rotary embeddings");
    if (q_lora_rank < 0) bad("q_lora_rank", "must be >= 0");
    if (partial_rotary_factor != 1.0)
      bad("partial_rotary_factor", "MLA rotates its own qk_rope_head_dim dimensions; remove the key");
  }
  std::string moe_families;
  for (const auto& t : model_types())
    if (arch_traits(t).has_moe) moe_families += (moe_families.empty() ? "" : ", ") + t;
  if (n_routed_experts > 0 && !a.has_moe)
    bad("n_routed_experts", model_type + " has no MoE layers (MoE architectures: " + moe_families + ")");
  if (a.moe_layers == MoELayers::kAll && n_routed_experts < 1)
    bad(a.experts_key, model_type + " has MoE layers only: need at least one expert");
  if (n_routed_experts > 0) {
    if (num_experts_per_tok < 1 || num_experts_per_tok > n_routed_experts)
      bad("num_experts_per_tok", "must be in [1, n_routed_experts=" + std::to_string(n_routed_experts) + "]");
    if (moe_intermediate_size < 1) bad("moe_intermediate_size", "must be >= 1 when n_routed_experts > 0");
    if (n_group < 1 || n_routed_experts % n_group != 0)
      bad("n_group", "must divide n_routed_experts (" + std::to_string(n_routed_experts) + ")");
    else if (topk_group < 1 || topk_group > n_group)
      bad("topk_group", "must be in [1, n_group=" + std::to_string(n_group) + "]");
    else if (topk_method != "greedy" && num_experts_per_tok > topk_group * (n_routed_experts / n_group))
      bad("num_experts_per_tok", "exceeds the experts in the top groups (topk_group * experts per group)");
    if (topk_method == "noaux_tc" && n_routed_experts / std::max<int64_t>(n_group, 1) < 2)
      bad("n_group", "noaux_tc ranks groups by their two best experts: need >= 2 experts per group");
    if (topk_method == "noaux_tc" && !a.correction_bias)
      bad("topk_method", "noaux_tc needs e_score_correction_bias, which " + model_type + " does not have");
    // The HF formats of these families have no keys for other routers: a checkpoint could not say what we trained.
    if (!a.deepseek_router) {
      if (scoring_func != "softmax") bad("scoring_func", model_type + " routes with softmax scores");
      if (topk_method != "greedy" || n_group != 1) bad("topk_method", model_type + " selects experts greedily (no groups)");
      if (routed_scaling_factor != 1.0) bad("routed_scaling_factor", model_type + " does not scale routing weights");
    }
    if (a.always_normalize && !norm_topk_prob)
      bad("norm_topk_prob", model_type + " always normalises the top-k weights; remove the key");
    if (a.shared == SharedExperts::kGated && shared_expert_intermediate_size < 1)
      bad("shared_expert_intermediate_size", "must be >= 1 (" + model_type + " has a gated shared expert)");
    if (a.shared != SharedExperts::kPlain && n_shared_experts > 0)
      bad("n_shared_experts", model_type + " has " +
                                  (a.shared == SharedExperts::kGated ? "one gated shared expert (shared_expert_intermediate_size)"
                                                                     : "no shared experts"));
  }
  if (attention_bias && !is_mla() && a.qkv_bias == BiasRule::kNever && a.o_bias == BiasRule::kNever)
    bad("attention_bias", model_type + " has no attention biases; remove the key");
  if (router_jitter_noise >= 1.0) bad("router_jitter_noise", "must be < 1");
  if (router_jitter_noise > 0.0 && !a.has_moe) bad("router_jitter_noise", model_type + " has no router");
  if (capacity_factor > 0.0 && n_routed_experts == 0) bad("capacity_factor", "the model has no routed experts; leave it at 0");
  // Sizes far beyond any real model are typos (or hostile files); refuse them before anything is allocated.
  auto at_most = [&](const char* key, int64_t value, int64_t limit) {
    if (value > limit) bad(key, std::to_string(value) + " is beyond any model this can build (at most " + std::to_string(limit) + ")");
  };
  at_most("vocab_size", vocab_size, int64_t{1} << 24);
  at_most("hidden_size", hidden_size, int64_t{1} << 17);
  at_most("intermediate_size", intermediate_size, int64_t{1} << 20);
  at_most("moe_intermediate_size", moe_intermediate_size, int64_t{1} << 20);
  at_most("shared_expert_intermediate_size", shared_expert_intermediate_size, int64_t{1} << 20);
  at_most("num_hidden_layers", num_hidden_layers, 4096);
  at_most("num_attention_heads", num_attention_heads, 4096);
  at_most("num_key_value_heads", num_key_value_heads, 4096);
  at_most("head_dim", head_dim, 8192);
  at_most("n_routed_experts", n_routed_experts, 1 << 16);
  at_most("n_shared_experts", n_shared_experts, 1 << 10);
  at_most("num_nextn_predict_layers", num_nextn_predict_layers, 64);
  at_most("max_position_embeddings", max_position_embeddings, int64_t{1} << 24);
  at_most("q_lora_rank", q_lora_rank, int64_t{1} << 17);
  at_most("kv_lora_rank", kv_lora_rank, int64_t{1} << 17);
  at_most("qk_nope_head_dim", qk_nope_head_dim, 8192);
  at_most("qk_rope_head_dim", qk_rope_head_dim, 8192);
  at_most("v_head_dim", v_head_dim, 8192);
  if (use_mtp && num_nextn_predict_layers < 1) bad("num_nextn_predict_layers", "must be >= 1 when use_mtp is true");
  if (use_mtp && !a.mtp) bad("use_mtp", "multi-token prediction needs model_type deepseek_v3");
  if (!rope_scaling.type.empty() && rope_scaling.factor < 1.0) bad("rope_scaling.factor", "must be >= 1");
  if (rope_scaling.factor > 65536.0) bad("rope_scaling.factor", "is beyond any context this can build (at most 65536)");
  else if (static_cast<double>(max_position_embeddings) * rope_scaling.factor > static_cast<double>(int64_t{1} << 24) &&
           rope_scaling.type == "dynamic")
    bad("rope_scaling.factor", "max_position_embeddings * factor is beyond any context this can build (at most 16777216)");
  if (!is_mla() && rope_scaling.type == "yarn" && (rope_scaling.mscale > 0) != (rope_scaling.mscale_all_dim > 0))
    bad(rope_scaling.mscale > 0 ? "rope_scaling.mscale" : "rope_scaling.mscale_all_dim",
        "transformers uses mscale only together with mscale_all_dim (one alone is ignored); give both or neither");
  if (rope_scaling.type == "llama3" && rope_scaling.low_freq_factor >= rope_scaling.high_freq_factor)
    bad("rope_scaling.low_freq_factor", "must be below high_freq_factor");
  if (rope_scaling.type == "dynamic" && rope_dim() <= 2)
    bad("rope_scaling", "dynamic NTK scaling needs more than 2 rotary dimensions");
  if (pad_token_id >= vocab_size) bad("pad_token_id", "must be < vocab_size");
  if (bos_token_id >= vocab_size) bad("bos_token_id", "must be < vocab_size");
  for (int64_t eos : eos_token_id)
    if (eos >= vocab_size) bad("eos_token_id", std::to_string(eos) + " must be < vocab_size");
  if (errs.empty()) return;
  std::string msg = errs.front();
  for (size_t i = 1; i < errs.size(); ++i) msg += "\n" + errs[i];
  throw usage_error("", msg);
}

bool ModelConfig::is_moe_layer(int64_t layer) const {
  if (n_routed_experts <= 0) return false;
  switch (arch().moe_layers) {
    case MoELayers::kDeepSeek:
      return layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
    case MoELayers::kQwen:
      return (layer + 1) % decoder_sparse_step == 0 &&
             std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) == mlp_only_layers.end();
    case MoELayers::kAll:
      return true;
  }
  return false;
}

int64_t ModelConfig::rope_dim() const {
  if (is_mla()) return qk_rope_head_dim;
  return static_cast<int64_t>(static_cast<double>(attn_head_dim()) * partial_rotary_factor);
}

namespace {
bool follows(BiasRule rule, bool attention_bias) {
  return rule == BiasRule::kAlways || (rule == BiasRule::kConfig && attention_bias);
}
}  // namespace

bool ModelConfig::qkv_bias() const { return follows(arch().qkv_bias, attention_bias); }
bool ModelConfig::o_bias() const { return follows(arch().o_bias, attention_bias); }

int64_t ModelConfig::context_length() const {
  if (rope_scaling.type != "dynamic") return max_position_embeddings;
  // Clamped so that an absurd factor reaches validate() as a number, not an overflow.
  return static_cast<int64_t>(std::min(static_cast<double>(max_position_embeddings) * rope_scaling.factor, 1e15));
}

nlohmann::json ModelConfig::to_hf_json() const {
  const ArchTraits& a = arch();
  nlohmann::json j;
  j["architectures"] = {a.hf_architecture};
  j["model_type"] = model_type;
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = a.expert_width_is_intermediate_size ? moe_intermediate_size : intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = is_mla() ? num_attention_heads : num_key_value_heads;
  j["max_position_embeddings"] = max_position_embeddings;
  j["rms_norm_eps"] = rms_norm_eps;
  j["rope_theta"] = rope_theta;
  const RopeScaling& rs = rope_scaling;
  if (rs.type.empty()) {
    j["rope_scaling"] = nullptr;
  } else {
    nlohmann::json r = {{"type", rs.type}, {"rope_type", rs.type}, {"factor", rs.factor}};
    if (rs.type == "yarn") {
      r["original_max_position_embeddings"] = rs.original_max_position_embeddings;
      r["beta_fast"] = rs.beta_fast;
      r["beta_slow"] = rs.beta_slow;
      if (rs.mscale > 0) r["mscale"] = rs.mscale;
      if (rs.mscale_all_dim > 0) r["mscale_all_dim"] = rs.mscale_all_dim;
      if (rs.attention_factor > 0) r["attention_factor"] = rs.attention_factor;
      if (!rs.truncate) r["truncate"] = false;
    } else if (rs.type == "llama3") {
      r["original_max_position_embeddings"] = rs.original_max_position_embeddings;
      r["low_freq_factor"] = rs.low_freq_factor;
      r["high_freq_factor"] = rs.high_freq_factor;
    }
    j["rope_scaling"] = r;
  }
  j["hidden_act"] = "silu";
  j["attention_dropout"] = 0.0;
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["initializer_range"] = initializer_range;
  j["bos_token_id"] = bos_token_id;
  // One id stays an integer; a list stays a list (what transformers and other readers were given).
  if (eos_token_id.size() == 1) j["eos_token_id"] = eos_token_id.front();
  else if (eos_token_id.empty()) j["eos_token_id"] = nullptr;
  else j["eos_token_id"] = eos_token_id;
  j["pad_token_id"] = pad_token_id >= 0 ? nlohmann::json(pad_token_id) : nlohmann::json(nullptr);
  j["use_cache"] = true;
  j["torch_dtype"] = "float32";
  if (!is_mla()) {
    if (!a.bias_key.empty()) j[a.bias_key] = a.qkv_bias == BiasRule::kAlways ? true : attention_bias;
    j["head_dim"] = attn_head_dim();  // always: some families' config classes default it to 128
    // Families whose config class defaults it (GLM: 0.5) get it always, the others when it is not 1.
    ModelConfig family;
    family.model_type = model_type;
    if (a.defaults) a.defaults(family);
    if (partial_rotary_factor != 1.0 || family.partial_rotary_factor != 1.0)
      j["partial_rotary_factor"] = partial_rotary_factor;
    if (a.has_moe) {
      j[a.experts_key] = n_routed_experts;
      j["num_experts_per_tok"] = num_experts_per_tok;
      if (!a.expert_width_is_intermediate_size) j["moe_intermediate_size"] = moe_intermediate_size;
      if (a.moe_layers == MoELayers::kQwen) {
        j["decoder_sparse_step"] = decoder_sparse_step;
        j["mlp_only_layers"] = mlp_only_layers;
        j["norm_topk_prob"] = norm_topk_prob;
      }
      if (a.shared == SharedExperts::kGated) j["shared_expert_intermediate_size"] = shared_expert_intermediate_size;
      if (a.sliding_window_key) j["sliding_window"] = nullptr;
      j["router_jitter_noise"] = router_jitter_noise;
      // The inverse of the mapping in decode(): alpha = router_aux_loss_coef * K.
      j["output_router_logits"] = aux_loss_alpha > 0;
      j["router_aux_loss_coef"] = aux_loss_alpha > 0
                                      ? aux_loss_alpha / static_cast<double>(std::max<int64_t>(num_experts_per_tok, 1))
                                      : router_aux_loss_coef;
    }
    return j;
  }
  j["attention_bias"] = false;
  j["q_lora_rank"] = q_lora_rank > 0 ? nlohmann::json(q_lora_rank) : nlohmann::json(nullptr);
  j["kv_lora_rank"] = kv_lora_rank;
  j["qk_nope_head_dim"] = qk_nope_head_dim;
  j["qk_rope_head_dim"] = qk_rope_head_dim;
  j["v_head_dim"] = v_head_dim;
  j["n_routed_experts"] = n_routed_experts > 0 ? nlohmann::json(n_routed_experts) : nlohmann::json(nullptr);
  j["n_shared_experts"] = n_shared_experts > 0 ? nlohmann::json(n_shared_experts) : nlohmann::json(nullptr);
  j["moe_intermediate_size"] = moe_intermediate_size;
  j["num_experts_per_tok"] = num_experts_per_tok > 0 ? nlohmann::json(num_experts_per_tok) : nlohmann::json(nullptr);
  // A dense MLA model is an MoE model whose MoE layers never start.
  j["first_k_dense_replace"] = n_routed_experts > 0 ? first_k_dense_replace : num_hidden_layers;
  j["moe_layer_freq"] = moe_layer_freq;
  j["routed_scaling_factor"] = routed_scaling_factor;
  j["scoring_func"] = scoring_func;
  j["topk_method"] = topk_method;
  j["n_group"] = n_group;
  j["topk_group"] = topk_group;
  j["norm_topk_prob"] = norm_topk_prob;
  j["aux_loss_alpha"] = aux_loss_alpha;
  j["seq_aux"] = seq_aux;
  if (a.mtp) j["num_nextn_predict_layers"] = num_nextn_predict_layers;
  if (a.rope_interleave_key) j["rope_interleave"] = rope_interleave;
  return j;
}

ModelConfig ModelConfig::from_hf_json_file(const std::string& path) {
  if (!std::filesystem::exists(path)) throw runtime_error(path, "config.json not found", "is this a model directory?");
  // JSON is YAML, so the strict YAML machinery (with line numbers) reads config.json too; but YAML also takes what
  // JSON readers refuse (comments, trailing commas, 0512 read as octal, a `base:` include), so the text must first
  // be JSON.
  const std::string text = env::read_file(path);
  bool object = false;
  try {
    object = json::parse(text, path).is_object();
  } catch (const nlohmann::json::exception& e) {
    throw usage_error(path, "not valid JSON (" + json::reason(e) + ")", "restore the model's config.json");
  } catch (const Error& e) {  // a NUL byte, a repeated key
    config::Document::parse(text, path);  // names a repeated key with its line
    throw usage_error("", e.what(), "restore the model's config.json");
  }
  if (!object) throw usage_error(path, "not a JSON object", "restore the model's config.json");
  const config::Document doc = config::Document::parse(text, path);  // for the line numbers of field errors
  config::ErrorList errors;
  config::Reader reader(doc, doc.root(), "", errors);
  ModelConfig c;
  decode(reader, c, /*strict=*/false);
  errors.throw_if_any();
  c.validate(path);
  return c;
}

// ---------------------------------------------------------------------------------------------------------------
// Counting
// ---------------------------------------------------------------------------------------------------------------

namespace {

int64_t attention_params(const ModelConfig& c) {
  const int64_t h = c.hidden_size, H = c.num_attention_heads;
  if (!c.is_mla()) {
    const int64_t d = c.attn_head_dim(), kv = c.num_key_value_heads;
    int64_t p = h * H * d + 2 * h * kv * d + H * d * h;
    if (c.qkv_bias()) p += H * d + 2 * kv * d;
    if (c.o_bias()) p += h;
    if (c.arch().qk_norm) p += 2 * d;
    return p;
  }
  int64_t p = 0;
  if (c.q_lora_rank > 0) p += h * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim();
  else p += h * H * c.qk_head_dim();
  p += h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank;
  p += c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim);
  p += H * c.v_head_dim * h;
  return p;
}

struct LayerCount {
  int64_t total, active;
};

LayerCount layer_params(const ModelConfig& c, int64_t layer) {
  const int64_t h = c.hidden_size;
  const int64_t attn = attention_params(c) + (c.arch().post_norms ? 4 : 2) * h;  // + the RMSNorms
  if (!c.is_moe_layer(layer)) return {attn + 3 * h * c.intermediate_size, attn + 3 * h * c.intermediate_size};
  const int64_t expert = 3 * h * c.moe_intermediate_size;
  const int64_t gate = c.n_routed_experts * h;  // the correction bias is a buffer, not a parameter
  const int64_t shared = c.arch().shared == SharedExperts::kGated ? 3 * h * c.shared_expert_intermediate_size + h
                                                                  : c.n_shared_experts * expert;
  return {attn + gate + shared + c.n_routed_experts * expert,
          attn + gate + shared + c.num_experts_per_tok * expert};
}

}  // namespace

ParamCounts count_parameters(const ModelConfig& c) {
  ParamCounts p;
  p.embedding = c.vocab_size * c.hidden_size;
  const int64_t head = c.tie_word_embeddings ? 0 : c.vocab_size * c.hidden_size;
  p.total = p.embedding + head + c.hidden_size;  // + final norm
  p.active = (c.tie_word_embeddings ? p.embedding : head) + c.hidden_size;
  const int64_t routed_per_block = c.n_routed_experts * 3 * c.hidden_size * c.moe_intermediate_size;
  p.largest_unit = std::max(p.embedding, head);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerCount lc = layer_params(c, l);
    p.largest_unit = std::max(p.largest_unit, lc.total);
    p.largest_layer = std::max(p.largest_layer, lc.total);
    p.total += lc.total;
    p.active += lc.active;
    if (c.is_moe_layer(l)) p.routed += routed_per_block;
  }
  // Each MTP module: enorm + hnorm + eh_proj + one decoder block (MoE when the model has experts) + shared_head.norm.
  const int64_t mtp_block = layer_params(c, std::max(c.num_hidden_layers, c.first_k_dense_replace)).total;
  p.mtp = c.num_nextn_predict_layers * (2 * c.hidden_size + 2 * c.hidden_size * c.hidden_size + mtp_block + c.hidden_size);
  if (c.use_mtp) p.total += c.mtp_depth() * (p.mtp / std::max<int64_t>(c.num_nextn_predict_layers, 1));
  if (c.use_mtp && c.mtp_depth() > 0) {
    p.largest_unit = std::max(p.largest_unit, p.mtp / c.num_nextn_predict_layers);
    p.largest_layer = std::max(p.largest_layer, p.mtp / c.num_nextn_predict_layers);
  }
  if (c.use_mtp && c.is_moe_layer(std::max(c.num_hidden_layers, c.first_k_dense_replace)))
    p.routed += c.mtp_depth() * routed_per_block;
  return p;
}

double training_flops_per_token(const ModelConfig& c, int64_t seq_len) {
  const ParamCounts p = count_parameters(c);
  const double matmul_params = static_cast<double>(p.active);
  const int64_t qk = c.is_mla() ? c.qk_head_dim() : c.attn_head_dim();
  const int64_t v = c.is_mla() ? c.v_head_dim : c.attn_head_dim();
  // QK^T and PV: 2 FLOPs per multiply-add, x3 for forward + backward, causal halves the work.
  const double attention = 6.0 * c.num_hidden_layers * c.num_attention_heads * (qk + v) * seq_len / 2.0;
  return 6.0 * matmul_params + attention;
}

int64_t kv_cache_bytes_per_token(const ModelConfig& c, int64_t bytes_per_element) {
  const int64_t per_layer = c.is_mla() ? (c.kv_lora_rank + c.qk_rope_head_dim)
                                       : 2 * c.num_key_value_heads * c.attn_head_dim();
  return per_layer * c.num_hidden_layers * bytes_per_element;
}

}  // namespace dsopen::model
