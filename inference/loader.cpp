#include "inference/loader.h"

#include <filesystem>

#include "model/safetensors.h"
#include "model/weights.h"
#include "utils/errors.h"

namespace fs = std::filesystem;

namespace dsopen::inference {

model::CausalLM load_model(const std::string& dir, torch::Device device, bool keep_mtp) {
  if (!fs::is_directory(dir)) throw runtime_error(dir, "model directory not found", "pass a checkpoint or HF model directory");
  model::ModelConfig c = model::ModelConfig::from_hf_json_file((fs::path(dir) / "config.json").string());
  model::WeightFiles weights(dir);
  c.use_mtp = keep_mtp && c.num_nextn_predict_layers > 0 &&
              weights.contains("model.layers." + std::to_string(c.num_hidden_layers) + ".eh_proj.weight");
  model::CausalLM m = [&] {
    model::SkipWeightInit skip;  // strict loading below writes every weight
    return model::CausalLM(c);
  }();
  model::load_hf_state_dict(m, weights, /*strict=*/true);
  m->to(device);
  m->eval();
  return m;
}

}  // namespace dsopen::inference
