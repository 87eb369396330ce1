// LoRA over a whole model: which projections get adapters, freezing the base, merging, and the PEFT adapter
// format (huggingface/peft), so adapters move between this framework and PEFT unchanged:
//   adapter_config.json        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r", "lora_alpha", "lora_dropout",
//                               "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "bias": "none",
//                               "fan_in_fan_out": false, "base_model_name_or_path", ...}
//   adapter_model.safetensors  base_model.model.<module>.lora_A.weight [r, in] and .lora_B.weight [out, r]
// <module> is the HF module path (model.layers.0.self_attn.q_proj); the layer math is in model/linear.h.
//
// Matching follows PEFT: a list of target names selects every projection whose path equals a name or ends with
// "." + name; a single string is a regular expression the whole path must match; "all-linear" selects every
// projection but lm_head. Routed experts (mlp.experts.N.*) are selected only when asked, MTP modules never.
// rank_pattern / alpha_pattern map a regex to a rank / alpha for the paths it ends (PEFT's `(.*\.)?(key)$`);
// the first key that matches wins, in file order.
#pragma once

#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

namespace dsopen::config {
class Reader;
}

namespace dsopen::model {

struct LoraConfig {
  int64_t r = 8;
  double alpha = 16;
  double dropout = 0.0;
  std::vector<std::string> target_modules{"q_proj", "kv_b_proj", "o_proj"};  // names (suffix match)
  std::string target_regex;     // when set: a regex over whole module paths instead of target_modules
  bool routed_experts = false;  // also adapt mlp.experts.N.{gate,up,down}_proj when their names are targeted
  bool use_rslora = false;      // scale alpha / sqrt(r) instead of alpha / r
  std::vector<std::pair<std::string, int64_t>> rank_pattern;  // regex -> rank, first match wins
  std::vector<std::pair<std::string, double>> alpha_pattern;  // regex -> alpha
};

// Decodes the adapter keys of a `lora:` section (r, alpha, dropout, target_modules, routed_experts, use_rslora,
// rank_pattern, alpha_pattern) into `out`; the caller decodes its other keys and calls finish().
void decode_lora_keys(config::Reader& r, LoraConfig& out);

// Paths of the projections `c` selects in `model` (MTP modules excluded). Usage errors, each naming its key:
// r <= 0 or a pattern rank <= 0, an invalid regex, a name that is no projection of any architecture, nothing
// selected at all.
std::vector<std::string> lora_targets(torch::nn::Module& model, const LoraConfig& c);

// Attaches fresh adapters (B zero; A random from a generator per module, seeded by its path and one draw of the
// global generator, so a module's adapter is the same whichever other modules the process holds — expert
// parallelism) to the projections `c` selects; returns their paths.
std::vector<std::string> inject_lora(torch::nn::Module& model, const LoraConfig& c);

bool has_lora(torch::nn::Module& model);
// True for parameter names of adapters (…lora_A.weight / …lora_B.weight).
bool is_lora_parameter(const std::string& name);

struct ParameterCounts {
  int64_t trainable = 0, total = 0;
};
// Sets requires_grad false on every parameter but the adapters'; with `base_dtype` other than float32 the frozen
// projection weights are stored in it (the adapters stay float32). Returns trainable and total parameter counts.
ParameterCounts freeze_base(torch::nn::Module& model, torch::Dtype base_dtype = torch::kFloat32);

// Folds every adapter into its weight and removes it; returns how many were merged.
int64_t merge_lora(torch::nn::Module& model);

// Writes DIR/adapter_config.json and DIR/adapter_model.safetensors (float32) for the attached adapters. The
// config is derived from them: target_modules lists projection names when those select exactly the adapted set
// (routed experts left out by exclude_modules when needed), full paths otherwise; r / lora_alpha are the most
// common values and rank_pattern / alpha_pattern give the others. Routed experts are stored per expert
// (mlp.experts.N.gate_proj, the names of the per-expert HF checkpoint tensors).
// `more`: adapter tensors (PEFT names) written alongside or instead of the attached ones' values: those of modules
// other processes hold (expert parallelism), or the fp32 values of sharded adapters (ZeRO-3).
std::string peft_tensor_name(const std::string& module_parameter_name);  // model.x.lora_A.weight -> PEFT's name
void save_adapter(torch::nn::Module& model, const std::string& dir, const std::string& base_model = "",
                  const std::map<std::string, torch::Tensor>& more = {});
// The attached adapters' tensors under their PEFT names (base_model.model.<path>.lora_A.weight, ...), float32, of the
// modules `select` accepts (by path).
std::map<std::string, torch::Tensor> adapter_tensors(torch::nn::Module& model,
                                                     const std::function<bool(const std::string&)>& select);

// Attaches the adapters stored in DIR (ours or PEFT's) and loads their weights; the modules come from the tensor
// names, ranks from the shapes (checked against adapter_config.json), alphas from the config. Returns their paths.
// PEFT's LoRA on fused expert tensors (transformers >= 5, target_parameters gate_up_proj / down_proj) is split into
// the equivalent per-expert adapters. Runtime errors name the file: missing directory or files, unsupported PEFT
// features (DoRA, biases, embeddings, modules_to_save, fan_in_fan_out), a module the model lacks, shapes that
// disagree with the base.
// `experts_elsewhere` (a model holding a share of the routed experts): adapters of routed experts the model does
// not hold are another process's, not an error.
std::vector<std::string> load_adapter(torch::nn::Module& model, const std::string& dir, bool experts_elsewhere = false);

// Serving several adapters over one base model (dsopen-serve --adapter NAME=DIR ...): adapter weights kept apart
// from the base in each Linear's served_adapters, and chosen per batch row of each forward.
//
// Loads the adapter in DIR (as load_adapter reads it) as served adapter number `id` (1, 2, ... in order) of
// `model`, whose projections must be float (not weight-only quantized) and carry no attached adapter. Adapters of
// routed experts are refused (an expert's input rows are tokens of many sequences): a usage error naming DIR that
// says to merge such an adapter instead. Returns the adapted paths.
std::vector<std::string> add_served_adapter(torch::nn::Module& model, const std::string& dir, int64_t id);

// The served adapter of each batch row of the forwards this thread runs while it lives (0: the base model):
// Linear and MLA's absorbed decode read it. Scopes nest; the innermost wins.
class ServedAdapterRows {
public:
  explicit ServedAdapterRows(std::vector<int64_t> ids);
  ~ServedAdapterRows();
  ServedAdapterRows(const ServedAdapterRows&) = delete;
  ServedAdapterRows& operator=(const ServedAdapterRows&) = delete;
  // The ids of the innermost live scope on this thread, or null.
  static const std::vector<int64_t>* current();
  // `rows` grouped by adapter id, ascending: (id, the row indices that take it).
  static std::vector<std::pair<int64_t, std::vector<int64_t>>> groups(const std::vector<int64_t>& rows);

private:
  std::vector<int64_t> ids_;
  const std::vector<int64_t>* previous_;
};

// Loads DIR's adapter weights into the adapters already attached (resuming a run): the two sets of modules and
// their shapes must be identical (but for other processes' routed experts with `experts_elsewhere`).
void load_adapter_weights(torch::nn::Module& model, const std::string& dir, bool experts_elsewhere = false);

}  // namespace dsopen::model
