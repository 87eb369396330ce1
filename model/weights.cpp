#include "model/weights.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <set>
#include <nlohmann/json.hpp>

#include "model/lora.h"
#include "utils/env.h"
#include "utils/errors.h"
#include "utils/progress.h"
#include "utils/json.h"

namespace fs = std::filesystem;

namespace dsopen::model {

namespace {

// Our module name -> HF name (only MTP modules differ).
std::string to_hf(const std::string& name, int64_t layers) {
  if (name.rfind("mtp.", 0) != 0) return name;
  const size_t dot = name.find('.', 4);
  const int64_t k = std::stoll(name.substr(4, dot - 4));
  return "model.layers." + std::to_string(layers + k) + name.substr(dot);
}

std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

}  // namespace

WeightFiles::WeightFiles(const std::string& dir) {
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  // model.safetensors first, as transformers reads a directory that has both.
  if (!fs::exists(index) || fs::exists(fs::path(dir) / "model.safetensors")) {
    path_ = (fs::path(dir) / "model.safetensors").string();
    if (!fs::exists(path_)) {
      std::error_code ec;
      if (fs::is_directory(dir, ec))
        for (const auto& e : fs::directory_iterator(dir, ec)) {
          const std::string name = e.path().filename().string();
          if (name.rfind("model-", 0) == 0 && name.find("-of-") != std::string::npos && e.path().extension() == ".safetensors")
            throw runtime_error(index.string(), "missing, but shards such as " + name + " are in the directory",
                                "restore model.safetensors.index.json (it maps every tensor to its shard)");
        }
      throw runtime_error(path_, "weights not found", "the directory needs model.safetensors or its index");
    }
    files_.push_back(std::make_unique<SafetensorsFile>(path_));
    for (const auto& n : files_[0]->names()) where_[n] = 0;
    return;
  }
  path_ = index.string();
  nlohmann::json j;
  try {
    j = json::parse(env::read_file(path_), path_);
  } catch (const nlohmann::json::exception& e) {
    throw runtime_error(path_, std::string("not valid JSON: ") + json::reason(e),
                        "restore the index of the shards (it maps every tensor to its file)");
  }
  if (!j.contains("weight_map") || !j["weight_map"].is_object())
    throw runtime_error(path_, "no weight_map object", "restore the index of the shards (it maps every tensor to its file)");
  if (j["weight_map"].empty()) throw runtime_error(path_, "weight_map names no tensor", "restore the index of the shards");
  std::map<std::string, size_t> file_index;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    if (!it.value().is_string()) throw runtime_error(path_, "weight_map entry '" + it.key() + "' is not a file name");
    const std::string shard = it.value().get<std::string>();
    if (!file_index.count(shard)) {
      const fs::path p = fs::path(dir) / shard;
      if (!fs::exists(p))
        throw runtime_error(path_, "names shard '" + shard + "', which is missing", "copy every shard of the model");
      file_index[shard] = files_.size();
      files_.push_back(std::make_unique<SafetensorsFile>(p.string()));
    }
    const size_t f = file_index[shard];
    if (!files_[f]->contains(it.key()))
      throw runtime_error(files_[f]->path(), "lacks tensor '" + it.key() + "' that the index places there");
    where_[it.key()] = f;
  }
}

std::vector<std::string> WeightFiles::names() const {
  std::vector<std::string> out;
  for (const auto& kv : where_) out.push_back(kv.first);
  return out;
}
std::vector<int64_t> WeightFiles::shape(const std::string& name) const { return files_[where_.at(name)]->shape(name); }
std::string WeightFiles::dtype(const std::string& name) const { return files_[where_.at(name)]->dtype(name); }
torch::Tensor WeightFiles::tensor(const std::string& name) const { return files_[where_.at(name)]->tensor(name); }
void WeightFiles::release(const std::string& name) const {
  auto it = where_.find(name);
  if (it != where_.end()) files_[it->second]->release(name);
}

namespace {
// The decoder layer an HF tensor name belongs to (model.layers.N.*); -1 for embeddings, norm and head. Layers from
// num_hidden_layers on are the MTP modules.
int64_t layer_of(const std::string& name) {
  return name.rfind("model.layers.", 0) == 0 ? std::stoll(name.substr(13, name.find('.', 13) - 13)) : int64_t{-1};
}
}  // namespace

std::vector<std::string> hf_names_of(const CausalLMImpl& model, const std::string& module_name) {
  const int64_t L = model.config().num_hidden_layers;
  std::vector<std::string> out{to_hf(module_name, L)};
  const std::string head = model.lm_head ? "lm_head.weight" : "model.embed_tokens.weight";
  for (size_t k = 0; k < model.mtp_list.size(); ++k) {
    const std::string prefix = "model.layers." + std::to_string(L + static_cast<int64_t>(k)) + ".";
    if (module_name == "model.embed_tokens.weight") out.push_back(prefix + "embed_tokens.weight");
    if (module_name == head) out.push_back(prefix + "shared_head.head.weight");
  }
  return out;
}

std::map<std::string, torch::Tensor> hf_state_dict(CausalLM& model) {
  const int64_t L = model->config().num_hidden_layers;
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : model->named_parameters())
    if (!is_lora_parameter(p.key())) out[to_hf(p.key(), L)] = p.value().detach();
  for (const auto& b : model->named_buffers()) out[to_hf(b.key(), L)] = b.value().detach();
  for (size_t k = 0; k < model->mtp_list.size(); ++k) {
    const std::string prefix = "model.layers." + std::to_string(L + static_cast<int64_t>(k)) + ".";
    out[prefix + "embed_tokens.weight"] = model->model->embed_tokens->weight.detach();
    out[prefix + "shared_head.head.weight"] =
        (model->lm_head ? model->lm_head->weight : model->model->embed_tokens->weight).detach();
  }
  return out;
}

int64_t load_hf_state_dict(CausalLM& model, const WeightFiles& file, const LoadOptions& o) {
  auto targets = hf_state_dict(model);
  std::vector<std::string> problems;
  std::set<std::string> consumed;
  const int64_t L = model->config().num_hidden_layers;
  torch::NoGradGuard no_grad;
  int64_t fresh = 0;
  int64_t total_bytes = 0;
  for (const auto& [name, t] : targets) total_bytes += t.numel() * t.element_size();
  Progress progress("loading " + file.path(), total_bytes, "B", 30.0, /*quiet_below_s=*/2.0);
  for (auto& [name, t] : targets) {
    const bool mtp_copy = name.find("embed_tokens") != std::string::npos && name.rfind("model.layers.", 0) == 0;
    const bool head_copy = name.find("shared_head.head") != std::string::npos;
    if (mtp_copy || head_copy) continue;  // copies of the shared tensors; the originals are loaded
    if (!file.contains(name)) {
      if (o.fresh_mtp && layer_of(name) >= L) {
        ++fresh;
        continue;
      }
      const AlternateTensor alt = o.alternate ? o.alternate(name, t, file) : AlternateTensor{};
      consumed.insert(alt.consumed.begin(), alt.consumed.end());
      if (!alt.problem.empty()) problems.push_back(alt.problem);
      else if (!alt.found) problems.push_back("missing " + name + " " + shape_str(t.sizes()));
      continue;
    }
    const auto shape = file.shape(name);
    if (shape != t.sizes().vec()) {
      problems.push_back(name + ": expected " + shape_str(t.sizes()) + ", found " + shape_str(shape));
      continue;
    }
    t.copy_(file.tensor(name));
    file.release(name);
    progress.advance(t.numel() * t.element_size());
  }
  if (problems.empty()) progress.finish();
  if (o.strict) {
    const bool expert_share = model->expert_placement().sharded();  // the other experts belong to other ranks
    for (const auto& name : file.names()) {
      if (targets.count(name) || consumed.count(name)) continue;
      if (expert_share && is_routed_expert_name(name)) continue;
      // MTP layers (the num_nextn_predict_layers after the decoder layers) of a model run without MTP are
      // expected, not errors.
      const int64_t layer = layer_of(name);
      const bool mtp_layer = layer >= L && layer < L + model->config().num_nextn_predict_layers;
      if (!mtp_layer) problems.push_back("unexpected " + name + " " + shape_str(file.shape(name)));
    }
  }
  if (problems.empty()) return fresh;
  std::string msg = std::to_string(problems.size()) + " tensor problem(s): " + problems.front();
  for (size_t i = 1; i < std::min<size_t>(problems.size(), 8); ++i) msg += "; " + problems[i];
  if (problems.size() > 8) msg += "; ...";
  const bool sharded = file.path().size() > 11 && file.path().compare(file.path().size() - 11, 11, ".index.json") == 0;
  throw runtime_error(file.path(), msg,
                      sharded && problems.front().rfind("missing ", 0) == 0
                          ? "the index or its shards lack tensors of this model config: restore them, or use the config they were written for"
                          : "the file does not match the model config");
}

std::string shard_file_name(int64_t k, int64_t n) {
  char name[64];
  std::snprintf(name, sizeof name, "model-%05lld-of-%05lld.safetensors", static_cast<long long>(k + 1),
                static_cast<long long>(n));
  return name;
}

namespace {

// Writes config.json and the weight files (one, or shards with their index) into `dir`; returns their names.
std::vector<std::string> write_hf_files(CausalLM& model, const fs::path& dir, const HfExportOptions& o) {
  const torch::Dtype dtype = o.dtype;
  const int64_t max_shard_bytes = o.max_shard_bytes;
  const int64_t L = model->config().num_hidden_layers;
  std::vector<std::map<std::string, torch::Tensor>> shards(1);
  int64_t bytes = 0;
  for (auto& [name, t] : hf_state_dict(model)) {
    if (!o.keep_mtp && layer_of(name) >= L) continue;
    auto out = t.is_floating_point() ? t.to(dtype) : t;
    const int64_t n = out.numel() * out.element_size();
    if (bytes > 0 && bytes + n > max_shard_bytes) shards.emplace_back(), bytes = 0;
    shards.back()[name] = out;
    bytes += n;
  }
  auto config = model->config().to_hf_json();
  config["torch_dtype"] = dtype == torch::kBFloat16 ? "bfloat16" : dtype == torch::kFloat16 ? "float16" : "float32";
  env::write_file_atomic((dir / "config.json").string(), config.dump(2) + "\n");
  if (shards.size() == 1) {
    save_safetensors((dir / "model.safetensors").string(), shards[0], {{"format", "pt"}});
    return {"config.json", "model.safetensors"};
  }
  nlohmann::json index = {{"metadata", nlohmann::json::object()}, {"weight_map", nlohmann::json::object()}};
  std::vector<std::string> written{"config.json", "model.safetensors.index.json"};
  int64_t total = 0;
  for (size_t k = 0; k < shards.size(); ++k) {
    const std::string name = shard_file_name(static_cast<int64_t>(k), static_cast<int64_t>(shards.size()));
    save_safetensors((dir / name).string(), shards[k], {{"format", "pt"}});
    written.push_back(name);
    for (const auto& [t, v] : shards[k]) {
      index["weight_map"][t] = name;
      total += v.numel() * v.element_size();
    }
  }
  index["metadata"]["total_size"] = total;
  env::write_file_atomic((dir / "model.safetensors.index.json").string(), index.dump(2) + "\n");
  return written;
}

}  // namespace

void save_hf_model(CausalLM& model, const std::string& dir, const HfExportOptions& options) {
  write_staged(dir, [&](const std::string& stage) {
    auto written = write_hf_files(model, stage, options);
    for (const auto& [name, contents] : options.files) {
      env::write_file_atomic((fs::path(stage) / name).string(), contents);
      written.push_back(name);
    }
    return written;
  });
}

void write_staged(const std::string& dir, const std::function<std::vector<std::string>(const std::string&)>& write) {
  // Everything is written into a staging sibling first and moved in only when whole: a failure (a full disk) leaves
  // an earlier export in `dir` as it was, never new config beside old weights.
  fs::path target = fs::path(dir).lexically_normal();
  if (target.filename().empty()) target = target.parent_path();
  const fs::path stage = target.parent_path() / ("." + target.filename().string() + ".partial-" + std::to_string(::getpid()));
  std::vector<std::string> written;
  try {
    fs::remove_all(stage);
    fs::create_directories(stage);
    written = write(stage.string());
  } catch (...) {
    std::error_code ec;
    fs::remove_all(stage, ec);
    throw;
  }
  fs::create_directories(target);
  // Weights first, config.json last: a reader never sees the new config with the old weights.
  std::stable_partition(written.begin(), written.end(), [](const std::string& n) { return n != "config.json"; });
  for (const auto& name : written) fs::rename(stage / name, target / name);
  fs::remove_all(stage);
  remove_stale_weights(target.string(), written);
}

void remove_stale_weights(const std::string& dir, const std::vector<std::string>& written) {
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    const bool weights = name == "model.safetensors.index.json" ||
                         (name.rfind("model", 0) == 0 && name.size() > 12 && name.compare(name.size() - 12, 12, ".safetensors") == 0);
    if (weights && std::find(written.begin(), written.end(), name) == written.end()) fs::remove(e.path());
  }
}

std::vector<std::string> WeightFiles::files() const {
  std::vector<std::string> out;
  for (const auto& f : files_) out.push_back(f->path());
  return out;
}

}  // namespace dsopen::model
