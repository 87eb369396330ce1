#include "inference/loader.h"

#include <filesystem>

#include "model/safetensors.h"
#include "model/weights.h"
#include "utils/errors.h"

namespace fs = std::filesystem;

namespace dsopen::inference {

model::CausalLM load_model(const std::string& dir, torch::Device device) {
  if (!fs::is_directory(dir)) throw runtime_error(dir, "model directory not found", "pass a checkpoint or HF model directory");
  model::ModelConfig c = model::ModelConfig::from_hf_json_file((fs::path(dir) / "config.json").string());
  c.use_mtp = false;
  model::WeightFiles weights(dir);
  model::CausalLM m(c);
  model::load_hf_state_dict(m, weights, /*strict=*/true);
  m->to(device);
  m->eval();
  return m;
}

}  // namespace dsopen::inference
