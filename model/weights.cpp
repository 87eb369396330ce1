#include "model/weights.h"

#include "utils/errors.h"

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

std::map<std::string, torch::Tensor> hf_state_dict(CausalLM& model) {
  const int64_t L = model->config().num_hidden_layers;
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : model->named_parameters()) out[to_hf(p.key(), L)] = p.value().detach();
  for (const auto& b : model->named_buffers()) out[to_hf(b.key(), L)] = b.value().detach();
  for (size_t k = 0; k < model->mtp_list.size(); ++k) {
    const std::string prefix = "model.layers." + std::to_string(L + static_cast<int64_t>(k)) + ".";
    out[prefix + "embed_tokens.weight"] = model->model->embed_tokens->weight.detach();
    out[prefix + "shared_head.head.weight"] =
        (model->lm_head ? model->lm_head->weight : model->model->embed_tokens->weight).detach();
  }
  return out;
}

void load_hf_state_dict(CausalLM& model, const SafetensorsFile& file, bool strict) {
  auto targets = hf_state_dict(model);
  std::vector<std::string> problems;
  const int64_t L = model->config().num_hidden_layers;
  torch::NoGradGuard no_grad;
  for (auto& [name, t] : targets) {
    const bool mtp_copy = name.find("embed_tokens") != std::string::npos && name.rfind("model.layers.", 0) == 0;
    const bool head_copy = name.find("shared_head.head") != std::string::npos;
    if (mtp_copy || head_copy) continue;  // copies of the shared tensors; the originals are loaded
    if (!file.contains(name)) {
      problems.push_back("missing " + name + " " + shape_str(t.sizes()));
      continue;
    }
    const auto shape = file.shape(name);
    if (shape != t.sizes().vec()) {
      problems.push_back(name + ": expected " + shape_str(t.sizes()) + ", found " + shape_str(shape));
      continue;
    }
    t.copy_(file.tensor(name));
  }
  if (strict) {
    for (const auto& name : file.names()) {
      if (targets.count(name)) continue;
      // MTP layers of a file whose model runs without MTP are expected, not errors.
      const bool mtp_layer = name.rfind("model.layers.", 0) == 0 &&
                             std::stoll(name.substr(13, name.find('.', 13) - 13)) >= L;
      if (!mtp_layer) problems.push_back("unexpected " + name + " " + shape_str(file.shape(name)));
    }
  }
  if (problems.empty()) return;
  std::string msg = std::to_string(problems.size()) + " tensor problem(s): " + problems.front();
  for (size_t i = 1; i < std::min<size_t>(problems.size(), 8); ++i) msg += "; " + problems[i];
  if (problems.size() > 8) msg += "; ...";
  throw runtime_error(file.path(), msg, "the file does not match the model config");
}

}  // namespace dsopen::model
