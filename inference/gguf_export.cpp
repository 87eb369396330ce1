#include "inference/gguf_export.h"

#include <spdlog/spdlog.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "data/hf_tokenizer.h"
#include "data/tokenizer.h"
#include "inference/export_files.h"
#include "model/weights.h"
#include "utils/errors.h"
#include "utils/json.h"

namespace fs = std::filesystem;

namespace dsopen::inference {

using model::gguf::TensorType;

model::gguf::TensorType gguf_type(const std::string& name, const std::string& flag) {
  static const std::map<std::string, TensorType> types = {{"f32", TensorType::F32},   {"f16", TensorType::F16},
                                                          {"bf16", TensorType::BF16}, {"q8_0", TensorType::Q8_0},
                                                          {"q4_0", TensorType::Q4_0}};
  auto it = types.find(name);
  if (it == types.end()) throw usage_error(flag, "'" + name + "' is not f32, f16, bf16, q8_0 or q4_0");
  return it->second;
}

namespace {

// llama.cpp's LLAMA_FTYPE for general.file_type.
uint32_t file_type(TensorType t) {
  switch (t) {
    case TensorType::F32: return 0;
    case TensorType::F16: return 1;
    case TensorType::Q4_0: return 2;
    case TensorType::Q8_0: return 7;
    case TensorType::BF16: return 32;
  }
  return 0;
}

// Rows of a [heads * d, in] projection from rotate-half pairs (i, i + d/2) to adjacent pairs (2i, 2i + 1), per head:
// convert_hf_to_gguf.py's LlamaModel.permute. Also for a bias ([heads * d]).
torch::Tensor half_to_interleaved(const torch::Tensor& w, int64_t heads) {
  auto sizes = w.sizes().vec();
  const int64_t d = w.size(0) / heads;
  std::vector<int64_t> view{heads, 2, d / 2};
  for (size_t k = 1; k < sizes.size(); ++k) view.push_back(sizes[k]);
  return w.reshape(view).transpose(1, 2).reshape(sizes).contiguous();
}

// The same on the rope rows only: the last `rope` rows of each of `heads` blocks of `block` rows.
torch::Tensor rope_rows_to_interleaved(const torch::Tensor& w, int64_t heads, int64_t block, int64_t rope) {
  auto v = w.reshape({heads, block, -1}).clone();
  auto r = v.narrow(1, block - rope, rope);
  r.copy_(half_to_interleaved(r.reshape({heads * rope, -1}), heads).reshape(r.sizes()));
  return v.reshape(w.sizes()).contiguous();
}

struct Family {
  std::string arch;           // GGUF general.architecture
  bool permute_qk = false;    // rotate-half q/k rows to adjacent pairs (llama.cpp's llama ropes adjacent pairs)
};

Family family_of(const model::ModelConfig& c) {
  const std::string& t = c.model_type;
  if (t == "llama" || t == "mixtral") return {"llama", true};
  if (t == "qwen2" || t == "qwen3") return {t, false};
  if (t == "deepseek_v2" || t == "deepseek_v3") return {"deepseek2", false};
  throw usage_error("model_type", "GGUF export covers llama, mixtral, qwen2, qwen3, deepseek_v2 and deepseek_v3, not '" +
                                      t + "'",
                    "--format hf exports it as an HF directory");
}

// HF name -> GGUF name for one decoder layer's tensor ("" when it is handled elsewhere: experts, kv_b_proj).
std::string layer_tensor_name(const std::string& rest) {
  static const std::vector<std::pair<std::string, std::string>> table = {
      {"input_layernorm.weight", "attn_norm.weight"},
      {"post_attention_layernorm.weight", "ffn_norm.weight"},
      {"self_attn.q_proj.weight", "attn_q.weight"},
      {"self_attn.q_proj.bias", "attn_q.bias"},
      {"self_attn.k_proj.weight", "attn_k.weight"},
      {"self_attn.k_proj.bias", "attn_k.bias"},
      {"self_attn.v_proj.weight", "attn_v.weight"},
      {"self_attn.v_proj.bias", "attn_v.bias"},
      {"self_attn.o_proj.weight", "attn_output.weight"},
      {"self_attn.o_proj.bias", "attn_output.bias"},
      {"self_attn.q_norm.weight", "attn_q_norm.weight"},
      {"self_attn.k_norm.weight", "attn_k_norm.weight"},
      {"self_attn.q_a_proj.weight", "attn_q_a.weight"},
      {"self_attn.q_a_layernorm.weight", "attn_q_a_norm.weight"},
      {"self_attn.q_b_proj.weight", "attn_q_b.weight"},
      {"self_attn.kv_a_proj_with_mqa.weight", "attn_kv_a_mqa.weight"},
      {"self_attn.kv_a_layernorm.weight", "attn_kv_a_norm.weight"},
      {"mlp.gate_proj.weight", "ffn_gate.weight"},
      {"mlp.up_proj.weight", "ffn_up.weight"},
      {"mlp.down_proj.weight", "ffn_down.weight"},
      {"mlp.gate.weight", "ffn_gate_inp.weight"},
      {"mlp.gate.e_score_correction_bias", "exp_probs_b.bias"},
      {"mlp.shared_experts.gate_proj.weight", "ffn_gate_shexp.weight"},
      {"mlp.shared_experts.up_proj.weight", "ffn_up_shexp.weight"},
      {"mlp.shared_experts.down_proj.weight", "ffn_down_shexp.weight"},
      {"block_sparse_moe.gate.weight", "ffn_gate_inp.weight"},
  };
  for (const auto& [hf, gguf] : table)
    if (rest == hf) return gguf;
  return "";
}

// Tokenizer and chat template metadata.
void add_tokenizer(model::gguf::Writer& w, const model::ModelDir& source, const std::string& adapter,
                   const model::ModelConfig& config) {
  const std::string dir = source.tokenizer_path(adapter);
  if (dir.empty()) {
    spdlog::warn("{}: no tokenizer next to the weights; the GGUF file has none (llama.cpp needs one to run it)", source.path());
    return;
  }
  const auto files = export_companion_files(source, config, adapter);
  nlohmann::json tok_config = nlohmann::json::object();
  if (files.count("tokenizer_config.json")) tok_config = json::parse(files.at("tokenizer_config.json"), "tokenizer_config.json");
  const auto tokenizer = data::load_tokenizer(dir);
  const int64_t V = config.vocab_size;
  if (tokenizer->vocab_size() > V)
    throw usage_error(tokenizer->source(), "the tokenizer has " + std::to_string(tokenizer->vocab_size()) +
                                               " tokens, more than the model's vocab_size " + std::to_string(V),
                      "export the tokenizer the model was trained with");
  std::vector<std::string> tokens;
  std::vector<int32_t> types;
  if (const auto* sp = dynamic_cast<const data::SentencePieceTokenizer*>(tokenizer.get())) {
    std::vector<float> scores;
    for (const auto& p : sp->pieces()) {
      tokens.push_back(p.piece);
      scores.push_back(p.score);
      // Chat markers such as <|User|>: llama.cpp treats user-defined pieces that look like "<|...|>" as control
      // tokens anyway (and warns that the file should have said so).
      const bool marker = p.type == 4 && p.piece.size() > 4 && p.piece.rfind("<|", 0) == 0 &&
                          p.piece.compare(p.piece.size() - 2, 2, "|>") == 0;
      types.push_back(marker ? 3 : p.type);
    }
    if (sp->model_type() != "bpe")
      spdlog::warn("{}: a SentencePiece {} model; llama.cpp's SentencePiece tokenizer merges pieces by score as for BPE "
                   "models, so its ids for new text may differ from ours (the model itself is unaffected)",
                   sp->source(), sp->model_type());
    for (int64_t id = static_cast<int64_t>(tokens.size()); id < V; ++id) {  // rows past the tokenizer: unused
      tokens.push_back("[PAD" + std::to_string(id) + "]");
      scores.push_back(-1000.0f);
      types.push_back(5);
    }
    w.add_string("tokenizer.ggml.model", "llama");
    w.add_strings("tokenizer.ggml.tokens", tokens);
    w.add_f32s("tokenizer.ggml.scores", scores);
    w.add_i32s("tokenizer.ggml.token_type", types);
    w.add_bool("tokenizer.ggml.add_space_prefix", false);  // our models are trained without SentencePiece's dummy prefix
    if (sp->unk_id() >= 0) w.add_u32("tokenizer.ggml.unknown_token_id", static_cast<uint32_t>(sp->unk_id()));
  } else {
    // tokenizer.json: byte-level BPE vocabulary, merges and added tokens as they are.
    const std::string path = (fs::path(dir) / "tokenizer.json").string();
    const auto j = json::parse(files.count("tokenizer.json") ? files.at("tokenizer.json") : std::string("{}"), path);
    const auto& model = j.at("model");
    tokens.assign(static_cast<size_t>(V), "");
    types.assign(static_cast<size_t>(V), 1);
    for (const auto& [piece, id] : model.at("vocab").items())
      if (id.get<int64_t>() < V) tokens[id.get<size_t>()] = piece;
    if (j.contains("added_tokens"))
      for (const auto& a : j["added_tokens"]) {
        const int64_t id = a.at("id").get<int64_t>();
        if (id >= V) continue;
        tokens[static_cast<size_t>(id)] = a.at("content").get<std::string>();
        types[static_cast<size_t>(id)] = a.value("special", false) ? 3 : 4;
      }
    for (int64_t id = 0; id < V; ++id)
      if (tokens[static_cast<size_t>(id)].empty()) tokens[static_cast<size_t>(id)] = "[PAD" + std::to_string(id) + "]", types[static_cast<size_t>(id)] = 5;
    std::vector<std::string> merges;
    for (const auto& m : model.at("merges"))
      merges.push_back(m.is_string() ? m.get<std::string>() : m.at(0).get<std::string>() + " " + m.at(1).get<std::string>());
    // llama.cpp picks its pre-tokenizer regexes by name; the names of the splits we can recognise by their pattern.
    const std::string pre_json = j.contains("pre_tokenizer") ? j["pre_tokenizer"].dump() : "";
    std::string pre = "default";
    if (pre_json.find("\\\\p{N}{1,3}") != std::string::npos && pre_json.find("\\\\p{M}") != std::string::npos) pre = "deepseek-v3";
    else if (pre_json.find("\\\\p{N}{1,3}") != std::string::npos) pre = "llama-bpe";
    else if (pre_json.find("|\\\\p{N}|") != std::string::npos) pre = "qwen2";
    if (pre == "default")
      spdlog::warn("{}: pre-tokenizer not recognised; llama.cpp will split new text with its default (GPT-2) rules", path);
    w.add_string("tokenizer.ggml.model", "gpt2");
    w.add_string("tokenizer.ggml.pre", pre);
    w.add_strings("tokenizer.ggml.tokens", tokens);
    w.add_i32s("tokenizer.ggml.token_type", types);
    w.add_strings("tokenizer.ggml.merges", merges);
  }
  if (tokenizer->bos_id() >= 0) w.add_u32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(tokenizer->bos_id()));
  if (tokenizer->eos_id() >= 0) w.add_u32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(tokenizer->eos_id()));
  if (tokenizer->pad_id() >= 0) w.add_u32("tokenizer.ggml.padding_token_id", static_cast<uint32_t>(tokenizer->pad_id()));
  // dsopen prepends BOS (as dsopen-generate does) unless the tokenizer's config says otherwise.
  const bool add_bos = tok_config.contains("add_bos_token") && tok_config["add_bos_token"].is_boolean()
                           ? tok_config["add_bos_token"].get<bool>()
                           : tokenizer->bos_id() >= 0;
  w.add_bool("tokenizer.ggml.add_bos_token", add_bos);
  w.add_bool("tokenizer.ggml.add_eos_token", false);
  if (tok_config.contains("chat_template") && tok_config["chat_template"].is_string())
    w.add_string("tokenizer.chat_template", tok_config["chat_template"].get<std::string>());
}

// Hyper-parameters under "<arch>." keys, as llama.cpp's loader reads them.
void add_hparams(model::gguf::Writer& w, const std::string& arch, const model::ModelConfig& c) {
  const std::string a = arch + ".";
  w.add_u32(a + "vocab_size", static_cast<uint32_t>(c.vocab_size));
  w.add_u32(a + "context_length", static_cast<uint32_t>(c.max_position_embeddings));
  w.add_u32(a + "embedding_length", static_cast<uint32_t>(c.hidden_size));
  w.add_u32(a + "block_count", static_cast<uint32_t>(c.num_hidden_layers));
  w.add_u32(a + "feed_forward_length", static_cast<uint32_t>(c.intermediate_size));
  w.add_u32(a + "attention.head_count", static_cast<uint32_t>(c.num_attention_heads));
  w.add_f32(a + "attention.layer_norm_rms_epsilon", static_cast<float>(c.rms_norm_eps));
  w.add_f32(a + "rope.freq_base", static_cast<float>(c.rope_theta));
  const auto& rs = c.rope_scaling;
  if (rs.type == "linear") {
    w.add_string(a + "rope.scaling.type", "linear");
    w.add_f32(a + "rope.scaling.factor", static_cast<float>(rs.factor));
  } else if (rs.type == "yarn") {
    w.add_string(a + "rope.scaling.type", "yarn");
    w.add_f32(a + "rope.scaling.factor", static_cast<float>(rs.factor));
    w.add_u32(a + "rope.scaling.original_context_length", static_cast<uint32_t>(rs.original_max_position_embeddings));
    w.add_f32(a + "rope.scaling.yarn_beta_fast", static_cast<float>(rs.beta_fast));
    w.add_f32(a + "rope.scaling.yarn_beta_slow", static_cast<float>(rs.beta_slow));
    if (arch == "deepseek2" && rs.mscale_all_dim > 0)  // llama.cpp divides by 0.1 again (its convert script's habit)
      w.add_f32(a + "rope.scaling.yarn_log_multiplier", static_cast<float>(0.1 * rs.mscale_all_dim));
  }
  if (c.n_routed_experts > 0) {
    w.add_u32(a + "expert_count", static_cast<uint32_t>(c.n_routed_experts));
    w.add_u32(a + "expert_used_count", static_cast<uint32_t>(c.num_experts_per_tok));
  }
  if (arch != "deepseek2") {
    w.add_u32(a + "attention.head_count_kv", static_cast<uint32_t>(c.num_key_value_heads));
    w.add_u32(a + "rope.dimension_count", static_cast<uint32_t>(c.rope_dim()));
    w.add_u32(a + "attention.key_length", static_cast<uint32_t>(c.attn_head_dim()));
    w.add_u32(a + "attention.value_length", static_cast<uint32_t>(c.attn_head_dim()));
    return;
  }
  // DeepSeek-V2/V3: MLA runs in llama.cpp as MQA over the compressed cache (one kv head of kv_lora_rank + rope).
  w.add_u32(a + "attention.head_count_kv", 1);
  w.add_u32(a + "leading_dense_block_count",
            static_cast<uint32_t>(c.n_routed_experts > 0 ? c.first_k_dense_replace : c.num_hidden_layers));
  w.add_u32(a + "attention.q_lora_rank", static_cast<uint32_t>(c.q_lora_rank));
  w.add_u32(a + "attention.kv_lora_rank", static_cast<uint32_t>(c.kv_lora_rank));
  w.add_u32(a + "attention.key_length", static_cast<uint32_t>(c.kv_lora_rank + c.qk_rope_head_dim));
  w.add_u32(a + "attention.value_length", static_cast<uint32_t>(c.kv_lora_rank));
  w.add_u32(a + "attention.key_length_mla", static_cast<uint32_t>(c.qk_head_dim()));
  w.add_u32(a + "attention.value_length_mla", static_cast<uint32_t>(c.v_head_dim));
  w.add_u32(a + "rope.dimension_count", static_cast<uint32_t>(c.qk_rope_head_dim));
  w.add_u32(a + "expert_feed_forward_length",
            static_cast<uint32_t>(c.n_routed_experts > 0 ? c.moe_intermediate_size : c.intermediate_size));
  w.add_u32(a + "expert_shared_count", static_cast<uint32_t>(c.n_shared_experts));
  if (c.n_routed_experts > 0) {
    // V2 normalises the top-k weights *or* scales them; llama.cpp (as V3) normalises *then* scales.
    const bool v2_normalized = c.model_type == "deepseek_v2" && c.norm_topk_prob && c.num_experts_per_tok > 1;
    w.add_f32(a + "expert_weights_scale", v2_normalized ? 1.0f : static_cast<float>(c.routed_scaling_factor));
    w.add_bool(a + "expert_weights_norm", c.norm_topk_prob && c.num_experts_per_tok > 1);
    w.add_u32(a + "expert_gating_func", c.scoring_func == "sigmoid" ? 2u : 1u);
    if (c.topk_method != "greedy") {
      w.add_u32(a + "expert_group_count", static_cast<uint32_t>(c.n_group));
      w.add_u32(a + "expert_group_used_count", static_cast<uint32_t>(c.topk_group));
    }
  }
}

// llama3 rope scaling as llama.cpp takes it: a rope_freqs tensor of per-frequency divisors (convert_hf_to_gguf.py
// LlamaModel.generate_extra_tensors).
torch::Tensor llama3_rope_freqs(const model::ModelConfig& c) {
  const auto& rs = c.rope_scaling;
  const int64_t dim = c.rope_dim();
  const double low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor;
  const double high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor;
  std::vector<float> factors;
  for (int64_t i = 0; i < dim; i += 2) {
    const double freq = 1.0 / std::pow(c.rope_theta, static_cast<double>(i) / dim);
    const double wavelen = 2 * M_PI / freq;
    if (wavelen < high_wavelen) factors.push_back(1.0f);
    else if (wavelen > low_wavelen) factors.push_back(static_cast<float>(rs.factor));
    else {
      const double smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) /
                            (rs.high_freq_factor - rs.low_freq_factor);
      factors.push_back(static_cast<float>(1.0 / ((1 - smooth) / rs.factor + smooth)));
    }
  }
  return torch::tensor(factors);
}

}  // namespace

void check_gguf_exportable(const model::ModelConfig& c) {
  const Family fam = family_of(c);
  const std::string& rs = c.rope_scaling.type;
  if (!rs.empty() && rs != "linear" && rs != "yarn" && rs != "llama3")
    throw usage_error("rope_scaling.type", "'" + rs + "' has no GGUF form llama.cpp runs", "--format hf exports an HF directory");
  if (fam.arch == "deepseek2" && c.n_routed_experts > 0 && c.moe_layer_freq != 1)
    throw usage_error("moe_layer_freq", "llama.cpp's deepseek2 needs every layer from first_k_dense_replace on to be MoE "
                                        "(moe_layer_freq 1), not " + std::to_string(c.moe_layer_freq),
                      "--format hf exports an HF directory");
}

void export_gguf(model::CausalLM& m, const model::ModelDir& source, const std::string& adapter, const std::string& path,
                 TensorType type) {
  const model::ModelConfig& c = m->config();
  check_gguf_exportable(c);
  const Family fam = family_of(c);
  model::gguf::Writer w;
  w.add_string("general.architecture", fam.arch);
  fs::path name_dir = fs::absolute(source.path()).lexically_normal();
  if (name_dir.filename().empty()) name_dir = name_dir.parent_path();
  std::string name = name_dir.filename().string();
  if (name.rfind("step_", 0) == 0 && name_dir.parent_path().filename() == "checkpoints")  // runs/tiny/checkpoints/step_N
    name = name_dir.parent_path().parent_path().filename().string() + "-" + name;
  w.add_string("general.name", name);
  w.add_u32("general.file_type", file_type(type));
  if (model::gguf::is_quantized(type)) w.add_u32("general.quantization_version", 2);
  add_hparams(w, fam.arch, c);
  add_tokenizer(w, source, adapter, c);

  const int64_t L = c.num_hidden_layers;
  auto kind_for = [&](const std::string& gguf_name, const torch::Tensor& t) {
    if (t.dim() <= 1 || gguf_name.find("ffn_gate_inp") != std::string::npos) return TensorType::F32;
    if (!model::gguf::is_quantized(type)) return type;
    if (t.size(-1) % 32 != 0) return TensorType::F16;
    if (type == TensorType::Q4_0 && gguf_name == "output.weight") return TensorType::Q8_0;
    return type;
  };
  auto add = [&](const std::string& gguf_name, const torch::Tensor& t) { w.add_tensor(gguf_name, t, kind_for(gguf_name, t)); };

  // Routed experts per layer and projection, stacked once all of a layer's have been seen.
  std::map<int64_t, std::map<std::string, std::map<int64_t, torch::Tensor>>> experts;
  const auto& proj = c.arch().expert_proj;  // gate, up, down names of an expert's projections
  const std::map<std::string, std::string> stacked = {{proj[0], "ffn_gate_exps.weight"}, {proj[1], "ffn_up_exps.weight"},
                                                      {proj[2], "ffn_down_exps.weight"}};
  torch::NoGradGuard no_grad;
  for (const auto& [hf, tensor] : model::hf_state_dict(m)) {
    const torch::Tensor t = tensor.detach().to(torch::kFloat32);
    if (hf == "model.embed_tokens.weight") add("token_embd.weight", t);
    else if (hf == "model.norm.weight") add("output_norm.weight", t);
    else if (hf == "lm_head.weight") {
      if (!c.tie_word_embeddings) add("output.weight", t);
    } else if (hf.rfind("model.layers.", 0) == 0) {
      const size_t dot = hf.find('.', 13);
      const int64_t layer = std::stoll(hf.substr(13, dot - 13));
      if (layer >= L) continue;  // multi-token prediction: llama.cpp decodes without it
      const std::string rest = hf.substr(dot + 1), blk = "blk." + std::to_string(layer) + ".";
      const std::string moe = c.arch().moe_block + ".experts.";
      if (rest.rfind(moe, 0) == 0) {
        const std::string after = rest.substr(moe.size());  // "{e}.{proj}.weight"
        const size_t d2 = after.find('.');
        const std::string p = after.substr(d2 + 1, after.rfind('.') - d2 - 1);
        if (!stacked.count(p)) throw runtime_error(hf, "no GGUF name for this expert tensor");
        auto& slot = experts[layer][p];
        slot[std::stoll(after.substr(0, d2))] = t;
        if (static_cast<int64_t>(slot.size()) == c.n_routed_experts) {
          std::vector<torch::Tensor> all;
          for (auto& [e, x] : slot) all.push_back(x);
          add(blk + stacked.at(p), torch::stack(all));
          experts[layer].erase(p);
        }
        continue;
      }
      if (rest == "self_attn.kv_b_proj.weight") {
        // [heads * (nope + v), kv_lora] -> k_b [heads, kv_lora, nope] (transposed), v_b [heads, v, kv_lora]
        const auto kv = t.view({c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank});
        add(blk + "attn_k_b.weight", kv.narrow(1, 0, c.qk_nope_head_dim).transpose(1, 2).contiguous());
        add(blk + "attn_v_b.weight", kv.narrow(1, c.qk_nope_head_dim, c.v_head_dim).contiguous());
        continue;
      }
      std::string g = layer_tensor_name(rest);
      if (g.empty()) throw runtime_error(hf, "no GGUF name for this tensor of a " + c.model_type + " model");
      torch::Tensor out = t;
      if (fam.permute_qk && (g.rfind("attn_q.", 0) == 0 || g.rfind("attn_k.", 0) == 0))
        out = half_to_interleaved(t, g.rfind("attn_q.", 0) == 0 ? c.num_attention_heads : c.num_key_value_heads);
      if (c.is_mla() && !c.rope_interleave) {  // rotate-half checkpoints: llama.cpp's deepseek2 ropes adjacent pairs
        if (g == "attn_q.weight" || g == "attn_q_b.weight")
          out = rope_rows_to_interleaved(t, c.num_attention_heads, c.qk_head_dim(), c.qk_rope_head_dim);
        if (g == "attn_kv_a_mqa.weight")
          out = rope_rows_to_interleaved(t, 1, c.kv_lora_rank + c.qk_rope_head_dim, c.qk_rope_head_dim);
      }
      add(blk + g, out);
    } else {
      throw runtime_error(hf, "no GGUF name for this tensor of a " + c.model_type + " model");
    }
  }
  for (const auto& [layer, left] : experts)
    if (!left.empty()) throw runtime_error("model.layers." + std::to_string(layer), "incomplete routed experts");
  if (c.rope_scaling.type == "llama3") w.add_tensor("rope_freqs.weight", llama3_rope_freqs(c), TensorType::F32);
  spdlog::info("GGUF {}: {} tensors, {:.1f} MiB of data ({}), architecture {}", path, w.tensor_count(),
               w.data_bytes() / 1048576.0, model::gguf::type_name(type), fam.arch);
  w.write(path);
}

}  // namespace dsopen::inference
