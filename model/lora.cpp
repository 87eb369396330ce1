#include "model/lora.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>

#include "model/linear.h"
#include "model/model_dir.h"
#include "model/safetensors.h"
#include "utils/config.h"
#include "utils/env.h"
#include "utils/errors.h"
#include "utils/json.h"

namespace fs = std::filesystem;
using ordered_json = nlohmann::ordered_json;

namespace dsopen::model {

namespace {

const std::string kPrefix = "base_model.model.";  // PEFT's prefix of a causal LM's module paths

// Projection names of every supported architecture (for suggestions when a target name is mistyped).
const std::vector<std::string>& known_names() {
  static const std::vector<std::string> names = {
      "q_proj",   "k_proj",  "v_proj",       "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
      "gate_proj", "up_proj", "gate_up_proj", "down_proj", "w1",    "w2",       "w3",                 "shared_expert_gate",
      "lm_head"};
  return names;
}

// The model's projections by path in module order, MTP modules excluded (HF models do not build them).
std::vector<std::pair<std::string, LinearImpl*>> projections(torch::nn::Module& model) {
  std::vector<std::pair<std::string, LinearImpl*>> out;
  for (const auto& item : model.named_modules("", /*include_self=*/false)) {
    if (item.key().rfind("mtp.", 0) == 0) continue;
    if (auto* lin = dynamic_cast<LinearImpl*>(item.value().get())) out.emplace_back(item.key(), lin);
  }
  return out;
}

bool is_routed_expert(const std::string& path) { return path.find(".experts.") != std::string::npos; }

std::string leaf(const std::string& path) {
  const size_t dot = path.rfind('.');
  return dot == std::string::npos ? path : path.substr(dot + 1);
}

// PEFT list matching: the path equals the name or ends with "." + name.
bool names_match(const std::string& path, const std::string& name) {
  return path == name || (path.size() > name.size() && path.compare(path.size() - name.size(), name.size(), name) == 0 &&
                          path[path.size() - name.size() - 1] == '.');
}

std::regex compile(const std::string& pattern, const std::string& where) {
  try {
    return std::regex(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    throw usage_error(where, "'" + pattern + "' is not a valid regular expression (" + e.what() + ")");
  }
}

bool ends_with_str(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool is_all_linear(const std::string& s) {
  std::string lower = s;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  return lower == "all-linear";
}

// PEFT's get_pattern_key: the first key K with re.match(rf"(.*\.)?({K})$", path).
template <class T>
const T* pattern_value(const std::vector<std::pair<std::string, T>>& patterns, const std::string& path,
                       const std::string& where) {
  for (const auto& [key, value] : patterns)
    if (std::regex_match(path, compile("(.*\\.)?(" + key + ")", where))) return &value;
  return nullptr;
}

std::string regex_escape(const std::string& s) {
  static const std::string special = R"(\^$.|?*+()[]{})";
  std::string out;
  for (char c : s) {
    if (special.find(c) != std::string::npos) out += '\\';
    out += c;
  }
  return out;
}

std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

ordered_json number(double v) {
  return v == std::floor(v) && std::abs(v) < 1e15 ? ordered_json(static_cast<int64_t>(v)) : ordered_json(v);
}

// ---- reading PEFT adapter directories -------------------------------------------------------------------------

struct AdapterWeights {
  torch::Tensor A, B;  // [r, in], [out, r], float32
  double alpha = 0;    // > 0: set by the layout (split fused experts); else from the config's patterns
};

struct AdapterFiles {
  std::string config_path, weights_path;
  LoraConfig config;
  std::vector<std::pair<std::string, AdapterWeights>> modules;  // path -> weights, in file (name) order
};

AdapterFiles read_adapter(const std::string& given) {
  // A run directory, its checkpoints directory or `latest` file name the adapter as they name a model.
  const std::string dir = resolve_latest(given);
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    throw runtime_error(dir, "adapter directory not found",
                        "pass a directory holding adapter_config.json and adapter_model.safetensors");
  AdapterFiles files;
  files.config_path = (fs::path(dir) / "adapter_config.json").string();
  files.weights_path = (fs::path(dir) / "adapter_model.safetensors").string();
  if (!fs::exists(files.config_path))
    throw runtime_error(files.config_path, "missing", "not a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)");
  ordered_json j;
  try {
    j = json::parse_ordered(env::read_file(files.config_path), files.config_path);
  } catch (const nlohmann::json::exception& e) {
    throw runtime_error(files.config_path, std::string("not valid JSON: ") + json::reason(e));
  }
  const std::string& cp = files.config_path;
  auto unsupported = [&](const std::string& what) {
    throw runtime_error(cp, what + " is not supported", "only plain LoRA adapters of linear layers load here");
  };
  if (j.contains("peft_type") && j["peft_type"] != "LORA") unsupported("peft_type " + j["peft_type"].dump());
  if (j.value("use_dora", false)) unsupported("DoRA (use_dora: true)");
  if (j.contains("bias") && j["bias"].is_string() && j["bias"] != "none") unsupported("bias " + j["bias"].dump());
  if (j.value("fan_in_fan_out", false)) unsupported("fan_in_fan_out: true");
  if (j.contains("target_parameters") && j["target_parameters"].is_array())
    for (const auto& t : j["target_parameters"]) {
      const std::string name = t.is_string() ? t.get<std::string>() : t.dump();
      auto ends = [&](const std::string& s) { return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0; };
      if (!ends("gate_up_proj") && !ends("down_proj")) unsupported("target_parameters entry '" + name + "'");
    }
  if (j.contains("modules_to_save") && !j["modules_to_save"].is_null() && !j["modules_to_save"].empty())
    unsupported("modules_to_save");
  // PEFT keys that change which layers are adapted or what an adapter computes: loading the tensors while
  // ignoring them would compute something else than peft does. (Initialization keys such as init_lora_weights,
  // loftq_config or eva_config do not matter once the weights exist.)
  for (const char* key : {"layers_to_transform", "layers_pattern", "trainable_token_indices",
                          "layer_replication", "alora_invocation_tokens", "velora_config", "monteclora_config",
                          "arrow_config", "kasa_config", "use_bdlora", "use_qalora", "lora_bias"}) {
    if (!j.contains(key)) continue;
    const auto& v = j[key];
    const bool inert = v.is_null() || (v.is_boolean() && !v.get<bool>()) || ((v.is_array() || v.is_object() || v.is_string()) && v.empty());
    if (!inert) unsupported(std::string(key) + " " + v.dump());
  }
  LoraConfig& c = files.config;
  try {
    c.r = j.at("r").get<int64_t>();
    c.alpha = j.at("lora_alpha").get<double>();
    c.dropout = j.contains("lora_dropout") && !j["lora_dropout"].is_null() ? j["lora_dropout"].get<double>() : 0.0;
    c.use_rslora = j.contains("use_rslora") && !j["use_rslora"].is_null() && j["use_rslora"].get<bool>();
    c.target_modules.clear();
    if (j.contains("target_modules") && j["target_modules"].is_string()) c.target_regex = j["target_modules"];
    else if (j.contains("target_modules") && j["target_modules"].is_array())
      c.target_modules = j["target_modules"].get<std::vector<std::string>>();
    if (j.contains("rank_pattern") && j["rank_pattern"].is_object())
      for (auto it = j["rank_pattern"].begin(); it != j["rank_pattern"].end(); ++it)
        c.rank_pattern.emplace_back(it.key(), it.value().get<int64_t>());
    if (j.contains("alpha_pattern") && j["alpha_pattern"].is_object())
      for (auto it = j["alpha_pattern"].begin(); it != j["alpha_pattern"].end(); ++it)
        c.alpha_pattern.emplace_back(it.key(), it.value().get<double>());
  } catch (const nlohmann::json::exception& e) {
    throw runtime_error(cp, std::string("bad field: ") + json::reason(e), "fix adapter_config.json");
  }
  if (c.r <= 0) throw runtime_error(cp, "r must be >= 1, got " + std::to_string(c.r));

  if (!fs::exists(files.weights_path)) {
    const std::string bin = (fs::path(dir) / "adapter_model.bin").string();
    if (fs::exists(bin))
      throw runtime_error(bin, "pickled PyTorch adapters are not read", "save it with safetensors (PEFT's default)");
    throw runtime_error(files.weights_path, "missing", "the adapter's weights belong next to adapter_config.json");
  }
  SafetensorsFile st(files.weights_path);
  static const std::regex key_re(R"(base_model\.model\.(.+)\.lora_([AB])\.weight)");
  std::map<std::string, AdapterWeights> by_module;
  std::vector<std::string> order;
  for (const auto& name : st.names()) {
    std::smatch m;
    if (!std::regex_match(name, m, key_re))
      throw runtime_error(files.weights_path, "tensor '" + name + "' is not a LoRA weight of a linear layer",
                          "only lora_A / lora_B weights load here (no DoRA magnitudes, biases, embeddings or "
                          "modules_to_save)");
    const std::string module = m[1];
    if (!by_module.count(module)) order.push_back(module);
    auto t = st.tensor(name).to(torch::kFloat32).clone();
    if (t.dim() != 2) throw runtime_error(files.weights_path, name + " has shape " + shape_str(t.sizes()) + ", not a matrix");
    (m[2] == "A" ? by_module[module].A : by_module[module].B) = t;
  }
  if (order.empty()) throw runtime_error(files.weights_path, "holds no LoRA weights");
  // peft adapts the modules target_modules names and exclude_modules does not (a regex: full match; a list:
  // names), and ignores other tensors of the file: refuse those rather than apply adapters peft would not.
  if (j.contains("exclude_modules") && !j["exclude_modules"].is_null()) {
    const auto& ex = j["exclude_modules"];
    if (!ex.is_string() && !ex.is_array()) unsupported("exclude_modules " + ex.dump());
    for (const auto& module : order) {
      const bool excluded = ex.is_string()
                                ? std::regex_match(module, compile(ex.get<std::string>(), cp + ": exclude_modules"))
                                : std::any_of(ex.begin(), ex.end(), [&](const ordered_json& n) {
                                    return n.is_string() && names_match(module, n.get<std::string>());
                                  });
      if (excluded)
        throw runtime_error(files.weights_path, "holds an adapter for " + module + ", which exclude_modules in " + cp +
                                                    " leaves out (peft would not apply it)",
                            "fix exclude_modules or remove the tensors");
    }
  }
  const LoraConfig& tc = files.config;
  const bool all_linear = !tc.target_regex.empty() && is_all_linear(tc.target_regex);
  if (!all_linear && (!tc.target_regex.empty() || !tc.target_modules.empty()))
    for (const auto& module : order) {
      if (ends_with_str(module, ".experts") || ends_with_str(module, ".experts.base_layer")) continue;  // target_parameters
      const bool targeted = !tc.target_regex.empty()
                                ? std::regex_match(module, compile(tc.target_regex, cp + ": target_modules"))
                                : std::any_of(tc.target_modules.begin(), tc.target_modules.end(),
                                              [&](const std::string& n) { return names_match(module, n); });
      if (!targeted)
        throw runtime_error(files.weights_path, "holds an adapter for " + module + ", which target_modules in " + cp +
                                                    " does not name (peft would not apply it)",
                            "fix target_modules or remove the tensors");
    }
  for (const auto& module : order) {
    const auto& w = by_module[module];
    if (!w.A.defined() || !w.B.defined())
      throw runtime_error(files.weights_path, module + " has lora_" + (w.A.defined() ? "A" : "B") + " but no lora_" +
                                                  (w.A.defined() ? "B" : "A"));
    if (w.A.size(0) != w.B.size(1))
      throw runtime_error(files.weights_path, module + ": lora_A " + shape_str(w.A.sizes()) + " and lora_B " +
                                                  shape_str(w.B.sizes()) + " disagree on the rank");
    files.modules.emplace_back(module, w);
  }
  return files;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Rank and alpha the config gives `path`.
std::pair<int64_t, double> rank_alpha(const LoraConfig& c, const std::string& path, const std::string& where) {
  const int64_t* r = pattern_value(c.rank_pattern, path, where + ".rank_pattern");
  const double* a = pattern_value(c.alpha_pattern, path, where + ".alpha_pattern");
  return {r ? *r : c.r, a ? *a : c.alpha};
}

// Checks an adapter of `path` against its base projection.
void check_shapes(const std::string& file, const std::string& path, const LinearImpl& lin, const AdapterWeights& w) {
  const int64_t out = lin.weight.size(0), in = lin.weight.size(1);
  if (w.A.size(1) != in || w.B.size(0) != out)
    throw runtime_error(file, path + ": adapter shapes disagree with the base: lora_A " + shape_str(w.A.sizes()) +
                                  " and lora_B " + shape_str(w.B.sizes()) + " need a projection [out, in] = " +
                                  shape_str({w.B.size(0), w.A.size(1)}) + ", the model's is " + shape_str({out, in}),
                        "use the base model the adapter was trained on");
}

// PEFT on transformers >= 5 keeps routed experts fused (gate_up_proj [E, 2I, H], down_proj [E, H, I]) and adapts
// each fused tensor with one LoRA pair: A [E*r, in] whose rows are expert-major, B [out, r*E] whose columns are
// expert-minor (PEFT's ParamWrapper: delta_e = B.view(out, r, E)[:, :, e] @ A.view(E, r, in)[e]). The gate_up
// wrapper sits inside the down_proj one, so their keys end in ".experts.base_layer" and ".experts". Each is split
// into the per-expert adapters of mlp.experts.N.{gate,up,down}_proj (gate: the first I rows of gate_up, up: the
// rest), which compute the same function.
void split_fused_experts(AdapterFiles& files, const std::map<std::string, LinearImpl*>& by_path) {
  std::vector<std::pair<std::string, AdapterWeights>> out;
  for (auto& [module, w] : files.modules) {
    const bool gate_up = ends_with(module, ".experts.base_layer");
    if (!gate_up && !(ends_with(module, ".experts") && !by_path.count(module))) {
      out.emplace_back(module, w);
      continue;
    }
    const std::string container = gate_up ? module.substr(0, module.size() - std::string(".base_layer").size()) : module;
    int64_t E = 0;
    while (by_path.count(container + "." + std::to_string(E) + ".down_proj")) ++E;
    if (E == 0)
      throw runtime_error(files.weights_path, "adapts fused experts at '" + container + "', which this model does not have",
                          "use the base model the adapter was trained on");
    const int64_t out_features = w.B.size(0), rows = w.A.size(0);
    if (rows % E != 0 || (gate_up && out_features % 2 != 0))
      throw runtime_error(files.weights_path, module + ": lora_A has " + std::to_string(rows) + " rows, not a multiple of " +
                                                  std::to_string(E) + " experts");
    const int64_t r = rows / E;
    const std::string param = container + (gate_up ? ".gate_up_proj" : ".down_proj");
    const auto [rank, alpha] = rank_alpha(files.config, param, files.config_path);
    if (rank != r)
      throw runtime_error(files.weights_path, param + ": rank " + std::to_string(r) + " per expert but adapter_config.json gives " +
                                                  std::to_string(rank));
    auto B = w.B.view({out_features, r, E});
    for (int64_t e = 0; e < E; ++e) {
      auto A_e = w.A.narrow(0, e * r, r).contiguous();
      auto B_e = B.select(2, e).contiguous();  // [out, r]
      const std::string expert = container + "." + std::to_string(e);
      if (gate_up) {
        const int64_t I = out_features / 2;
        out.emplace_back(expert + ".gate_proj", AdapterWeights{A_e, B_e.narrow(0, 0, I).contiguous(), alpha});
        out.emplace_back(expert + ".up_proj", AdapterWeights{A_e, B_e.narrow(0, I, I).contiguous(), alpha});
      } else {
        out.emplace_back(expert + ".down_proj", AdapterWeights{A_e, B_e, alpha});
      }
    }
  }
  files.modules = std::move(out);
}

}  // namespace

// ---- config ---------------------------------------------------------------------------------------------------

void decode_lora_keys(config::Reader& r, LoraConfig& out) {
  r.optional("r", out.r, config::at_least(1));
  r.optional("alpha", out.alpha, config::greater_than(0));
  r.optional("dropout", out.dropout, config::in_range(0.0, 0.99));
  if (r.has("target_modules")) {
    if (r.raw("target_modules").IsScalar()) {
      out.target_regex = r.raw("target_modules").Scalar();
      out.target_modules.clear();
      if (!is_all_linear(out.target_regex)) {
        try {
          std::regex re(out.target_regex, std::regex::ECMAScript);
        } catch (const std::regex_error& e) {
          r.error("target_modules", "'" + out.target_regex + "' is not a valid regular expression (" + e.what() + ")");
        }
      }
    } else {
      r.optional("target_modules", out.target_modules);
      out.target_regex.clear();
      if (out.target_modules.empty()) r.error("target_modules", "must name at least one projection");
    }
  }
  r.optional("routed_experts", out.routed_experts);
  r.optional("use_rslora", out.use_rslora);
  auto patterns = [&](const std::string& key, auto& dst, bool integer) {
    if (!r.has(key)) return;
    auto n = r.raw(key);
    if (n.IsNull()) return;
    if (!n.IsMap()) return r.error(key, "expected a mapping of module pattern -> value");
    dst.clear();
    for (const auto& kv : n) {
      const std::string k = kv.first.as<std::string>();
      try {
        std::regex re("(.*\\.)?(" + k + ")", std::regex::ECMAScript);
      } catch (const std::regex_error&) {
        r.error(key, "'" + k + "' is not a valid regular expression");
        continue;
      }
      double v = 0;
      try {
        v = integer ? static_cast<double>(kv.second.as<long long>()) : kv.second.as<double>();
      } catch (const YAML::Exception&) {
        r.error(key, "'" + k + "': expected " + std::string(integer ? "an integer" : "a number"));
        continue;
      }
      if (v <= 0) {
        r.error(key, "'" + k + "': must be " + (integer ? ">= 1" : "> 0") + ", got " + kv.second.Scalar());
        continue;
      }
      dst.emplace_back(k, static_cast<typename std::decay_t<decltype(dst)>::value_type::second_type>(v));
    }
  };
  patterns("rank_pattern", out.rank_pattern, true);
  patterns("alpha_pattern", out.alpha_pattern, false);
}

// ---- targets, injection, freezing, merging --------------------------------------------------------------------

std::vector<std::string> lora_targets(torch::nn::Module& model, const LoraConfig& c) {
  if (c.r <= 0) throw usage_error("lora.r", "must be >= 1, got " + std::to_string(c.r));
  for (const auto& [key, r] : c.rank_pattern)
    if (r <= 0) throw usage_error("lora.rank_pattern", "'" + key + "': must be >= 1, got " + std::to_string(r));
  if (!(c.alpha > 0)) throw usage_error("lora.alpha", "must be > 0");
  const auto projs = projections(model);
  const bool all_linear = !c.target_regex.empty() && is_all_linear(c.target_regex);
  const bool use_regex = !c.target_regex.empty() && !all_linear;
  std::regex re;
  if (use_regex) re = compile(c.target_regex, "lora.target_modules");
  if (!use_regex && !all_linear) {
    if (c.target_modules.empty()) throw usage_error("lora.target_modules", "names no projection");
    for (const auto& name : c.target_modules) {
      const bool matches = std::any_of(projs.begin(), projs.end(), [&](const auto& p) { return names_match(p.first, name); });
      const bool known = std::find(known_names().begin(), known_names().end(), name) != known_names().end();
      if (!matches && !known) {
        const std::string guess = config::closest_match(name, known_names());
        throw usage_error("lora.target_modules", "'" + name + "' is not a projection of this model" +
                                                     (guess.empty() ? "" : " (did you mean '" + guess + "'?)"));
      }
    }
  }
  std::vector<std::string> out;
  for (const auto& [path, lin] : projs) {
    if (!c.routed_experts && is_routed_expert(path)) continue;
    bool take = false;
    if (all_linear) take = path != "lm_head";
    else if (use_regex) take = std::regex_match(path, re);
    else take = std::any_of(c.target_modules.begin(), c.target_modules.end(), [&](const std::string& n) { return names_match(path, n); });
    if (take) out.push_back(path);
  }
  if (out.empty()) {
    std::vector<std::string> names;
    for (const auto& p : projs)
      if (std::find(names.begin(), names.end(), leaf(p.first)) == names.end()) names.push_back(leaf(p.first));
    std::string list;
    for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
    throw usage_error("lora.target_modules", "selects no projection of this model",
                      "its projections are " + list +
                          (c.routed_experts ? "" : " (routed experts only with lora.routed_experts: true)") +
                          "; a single string is a regular expression over whole paths such as "
                          "model.layers.0.self_attn.o_proj");
  }
  return out;
}

std::vector<std::string> inject_lora(torch::nn::Module& model, const LoraConfig& c) {
  const auto targets = lora_targets(model, c);
  std::map<std::string, LinearImpl*> by_path;
  for (const auto& [path, lin] : projections(model)) by_path[path] = lin;
  // One draw of the global generator, then a generator per module for its A (restored after each).
  const uint64_t base = draw_seed_base();
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  const auto state = gen.get_state();
  for (const auto& path : targets) {
    const auto [r, alpha] = rank_alpha(c, path, "lora");
    gen.set_current_seed(named_seed(base, path));
    by_path.at(path)->add_lora(r, alpha, c.use_rslora, c.dropout);
  }
  gen.set_state(state);
  return targets;
}

bool is_lora_parameter(const std::string& name) {
  auto ends = [&](const std::string& s) {
    return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
  };
  return ends(".lora_A.weight") || ends(".lora_B.weight");
}

bool has_lora(torch::nn::Module& model) {
  for (const auto& [path, lin] : projections(model))
    if (lin->has_lora()) return true;
  return false;
}

ParameterCounts freeze_base(torch::nn::Module& model, torch::Dtype base_dtype) {
  ParameterCounts counts;
  for (auto& p : model.named_parameters()) {
    const bool adapter = is_lora_parameter(p.key());
    p.value().set_requires_grad(adapter);
    counts.total += p.value().numel();
    if (adapter) counts.trainable += p.value().numel();
  }
  if (base_dtype != torch::kFloat32) {
    torch::NoGradGuard no_grad;
    for (const auto& item : model.named_modules("", false))
      if (auto* lin = dynamic_cast<LinearImpl*>(item.value().get()))
        if (lin->weight.scalar_type() != base_dtype) lin->weight.set_data(lin->weight.to(base_dtype));
  }
  return counts;
}

int64_t merge_lora(torch::nn::Module& model) {
  int64_t n = 0;
  for (const auto& item : model.named_modules("", false))
    if (auto* lin = dynamic_cast<LinearImpl*>(item.value().get()); lin && lin->has_lora()) {
      lin->merge_lora();
      ++n;
    }
  return n;
}

// ---- PEFT files -----------------------------------------------------------------------------------------------

std::string peft_tensor_name(const std::string& module_parameter_name) { return kPrefix + module_parameter_name; }

std::map<std::string, torch::Tensor> adapter_tensors(torch::nn::Module& model,
                                                     const std::function<bool(const std::string&)>& select) {
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& [path, lin] : projections(model))
    if (lin->has_lora() && select(path)) {
      tensors[kPrefix + path + ".lora_A.weight"] = lin->lora_A->weight.detach().to(torch::kFloat32);
      tensors[kPrefix + path + ".lora_B.weight"] = lin->lora_B->weight.detach().to(torch::kFloat32);
    }
  return tensors;
}

void save_adapter(torch::nn::Module& model, const std::string& dir, const std::string& base_model,
                  const std::map<std::string, torch::Tensor>& more) {
  const auto projs = projections(model);
  std::vector<std::pair<std::string, LinearImpl*>> adapted;
  for (const auto& p : projs)
    if (p.second->has_lora()) adapted.push_back(p);
  if (adapted.empty()) throw usage_error(dir, "the model has no LoRA adapters to save");

  // The attached adapters' values, but for those `more` gives (ZeRO-3: the attached ones are not whole here).
  std::map<std::string, torch::Tensor> tensors =
      adapter_tensors(model, [&](const std::string& path) { return !more.count(kPrefix + path + ".lora_A.weight"); });
  for (const auto& [name, t] : more) tensors[name] = t;

  // The most common rank and alpha are the defaults; the others go to the patterns.
  auto most_common = [&](auto get) {
    std::map<decltype(get(adapted.front().second)), int> n;
    for (const auto& p : adapted) ++n[get(p.second)];
    return std::max_element(n.begin(), n.end(), [](const auto& a, const auto& b) { return a.second < b.second; })->first;
  };
  const int64_t r = most_common([](LinearImpl* l) { return l->lora_rank; });
  const double alpha = most_common([](LinearImpl* l) { return l->lora_alpha; });

  // Names when they select exactly the adapted set among the model's projections (with routed experts excluded
  // by exclude_modules when that is the difference), full paths otherwise.
  std::vector<std::string> names;
  std::set<std::string> adapted_paths;
  bool any_expert = false;
  for (const auto& [path, lin] : adapted) {
    adapted_paths.insert(path);
    any_expert |= is_routed_expert(path);
    if (std::find(names.begin(), names.end(), leaf(path)) == names.end()) names.push_back(leaf(path));
  }
  std::set<std::string> by_names, by_names_no_experts;
  for (const auto& [path, lin] : projs)
    if (std::find(names.begin(), names.end(), leaf(path)) != names.end()) {
      by_names.insert(path);
      if (!is_routed_expert(path)) by_names_no_experts.insert(path);
    }
  ordered_json targets = ordered_json::array();
  ordered_json exclude = nullptr;
  if (by_names == adapted_paths || (!any_expert && by_names_no_experts == adapted_paths)) {
    for (const auto& n : names) targets.push_back(n);
    if (by_names != adapted_paths) exclude = R"(.*\.experts\.[0-9]+\..*)";
  } else {
    for (const auto& p : adapted_paths) targets.push_back(p);
  }

  // A pattern per name when every adapted module of that name agrees, per module otherwise.
  auto patterns = [&](auto get, auto default_value) {
    ordered_json out = ordered_json::object();
    for (const auto& n : names) {
      std::vector<std::pair<std::string, LinearImpl*>> same;
      for (const auto& p : adapted)
        if (leaf(p.first) == n) same.push_back(p);
      const bool uniform = std::all_of(same.begin(), same.end(), [&](const auto& p) { return get(p.second) == get(same.front().second); });
      if (uniform) {
        if (get(same.front().second) != default_value) out[n] = number(get(same.front().second));
      } else {
        for (const auto& [path, lin] : same)
          if (get(lin) != default_value) out[regex_escape(path)] = number(get(lin));
      }
    }
    return out;
  };
  const auto rank_pattern = patterns([](LinearImpl* l) { return static_cast<double>(l->lora_rank); }, static_cast<double>(r));
  const auto alpha_pattern = patterns([](LinearImpl* l) { return l->lora_alpha; }, alpha);

  ordered_json j;
  j["alpha_pattern"] = alpha_pattern;
  j["base_model_name_or_path"] = base_model.empty() ? ordered_json(nullptr) : ordered_json(base_model);
  j["bias"] = "none";
  if (!exclude.is_null()) j["exclude_modules"] = exclude;
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;
  j["init_lora_weights"] = true;
  j["layers_pattern"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["lora_alpha"] = number(alpha);
  j["lora_dropout"] = adapted.front().second->lora_dropout;
  j["modules_to_save"] = nullptr;
  j["peft_type"] = "LORA";
  j["r"] = r;
  j["rank_pattern"] = rank_pattern;
  j["revision"] = nullptr;
  j["target_modules"] = targets;
  j["task_type"] = "CAUSAL_LM";
  j["use_dora"] = false;
  j["use_rslora"] = adapted.front().second->lora_rslora;

  fs::create_directories(dir);
  save_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), tensors, {{"format", "pt"}});
  env::write_file_atomic((fs::path(dir) / "adapter_config.json").string(), j.dump(2) + "\n");
}

std::vector<std::string> load_adapter(torch::nn::Module& model, const std::string& dir, bool experts_elsewhere) {
  AdapterFiles files = read_adapter(dir);
  if (has_lora(model)) throw usage_error(dir, "the model already has LoRA adapters", "load one adapter per model");
  std::map<std::string, LinearImpl*> by_path;
  for (const auto& [path, lin] : projections(model)) by_path[path] = lin;
  split_fused_experts(files, by_path);
  if (experts_elsewhere)  // other processes' experts
    for (auto it = files.modules.begin(); it != files.modules.end();)
      it = !by_path.count(it->first) && is_routed_expert(it->first) ? files.modules.erase(it) : std::next(it);
  // Check everything before attaching anything.
  for (const auto& [path, w] : files.modules) {
    auto it = by_path.find(path);
    if (it == by_path.end())
      throw runtime_error(files.weights_path, "adapts '" + path + "', which this model does not have",
                          "use the base model the adapter was trained on");
    check_shapes(files.weights_path, path, *it->second, w);
    const int64_t r = rank_alpha(files.config, path, files.config_path).first;
    if (w.alpha <= 0 && w.A.size(0) != r)
      throw runtime_error(files.weights_path, path + ": lora_A has " + std::to_string(w.A.size(0)) +
                                                  " rows but adapter_config.json gives it rank " + std::to_string(r),
                          "the weights and adapter_config.json come from different adapters");
  }
  std::vector<std::string> paths;
  torch::NoGradGuard no_grad;
  for (const auto& [path, w] : files.modules) {
    LinearImpl* lin = by_path.at(path);
    const double alpha = w.alpha > 0 ? w.alpha : rank_alpha(files.config, path, files.config_path).second;
    lin->add_lora(w.A.size(0), alpha, files.config.use_rslora, files.config.dropout);
    lin->lora_A->weight.copy_(w.A);
    lin->lora_B->weight.copy_(w.B);
    paths.push_back(path);
  }
  return paths;
}

void load_adapter_weights(torch::nn::Module& model, const std::string& dir, bool experts_elsewhere) {
  const AdapterFiles files = read_adapter(dir);
  std::vector<std::pair<std::string, LinearImpl*>> adapted;
  std::set<std::string> held;
  for (const auto& p : projections(model)) {
    held.insert(p.first);
    if (p.second->has_lora()) adapted.push_back(p);
  }
  std::map<std::string, const AdapterWeights*> in_file;
  for (const auto& [path, w] : files.modules)
    if (!(experts_elsewhere && !held.count(path) && is_routed_expert(path))) in_file[path] = &w;
  if (adapted.size() != in_file.size() ||
      !std::all_of(adapted.begin(), adapted.end(), [&](const auto& p) { return in_file.count(p.first) > 0; }))
    throw runtime_error(files.weights_path,
                        "adapts " + std::to_string(in_file.size()) + " modules" +
                            (experts_elsewhere ? " this rank holds (its share of the routed experts)" : "") + ", this run " +
                            std::to_string(adapted.size()) + " (a different set)",
                        "resume with the lora: settings the checkpoint was written with");
  torch::NoGradGuard no_grad;
  for (const auto& [path, lin] : adapted) {
    const AdapterWeights& w = *in_file.at(path);
    check_shapes(files.weights_path, path, *lin, w);
    const double alpha = rank_alpha(files.config, path, files.config_path).second;
    if (w.A.size(0) != lin->lora_rank || alpha != lin->lora_alpha || files.config.use_rslora != lin->lora_rslora)
      throw runtime_error(files.weights_path, path + ": rank " + std::to_string(w.A.size(0)) + ", alpha " +
                                                  std::to_string(alpha) + " differ from this run's rank " +
                                                  std::to_string(lin->lora_rank) + ", alpha " + std::to_string(lin->lora_alpha),
                          "resume with the lora: settings the checkpoint was written with");
    lin->lora_A->weight.copy_(w.A);
    lin->lora_B->weight.copy_(w.B);
  }
}

namespace {
thread_local const std::vector<int64_t>* served_rows = nullptr;
}  // namespace

ServedAdapterRows::ServedAdapterRows(std::vector<int64_t> ids) : ids_(std::move(ids)), previous_(served_rows) {
  served_rows = &ids_;
}
ServedAdapterRows::~ServedAdapterRows() { served_rows = previous_; }
const std::vector<int64_t>* ServedAdapterRows::current() { return served_rows; }

std::vector<std::pair<int64_t, std::vector<int64_t>>> ServedAdapterRows::groups(const std::vector<int64_t>& rows) {
  std::map<int64_t, std::vector<int64_t>> by_id;
  for (size_t r = 0; r < rows.size(); ++r) by_id[rows[r]].push_back(static_cast<int64_t>(r));
  return {by_id.begin(), by_id.end()};
}

std::vector<std::string> add_served_adapter(torch::nn::Module& model, const std::string& dir, int64_t id) {
  TORCH_CHECK(id >= 1, "add_served_adapter: ids start at 1");
  for (const auto& [path, lin] : projections(model))
    if (lin->weight_only)
      throw usage_error(dir, "cannot serve an adapter over weight-only quantized layers (" + path + ")",
                        "serve a float model, or dequantize on load (--dequantize)");
  const std::vector<std::string> paths = load_adapter(model, dir);
  for (const auto& path : paths)
    if (is_routed_expert(path)) {
      for (const auto& [p, lin] : projections(model)) lin->remove_lora();
      throw usage_error(dir, "adapts routed experts (" + path + "), which cannot be chosen per request",
                        "merge it into the model (dsopen-convert --adapter) and serve the result");
    }
  for (const auto& [path, lin] : projections(model)) {
    if (static_cast<int64_t>(lin->served_adapters.size()) < id) lin->served_adapters.resize(static_cast<size_t>(id));
    if (!lin->lora_A) continue;
    lin->served_adapters[static_cast<size_t>(id - 1)] = {lin->lora_A->weight.detach().clone(),
                                                         lin->lora_B->weight.detach().clone(), lin->lora_scale};
    lin->remove_lora();
  }
  return paths;
}

}  // namespace dsopen::model
