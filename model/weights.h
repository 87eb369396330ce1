// The model's weights under HuggingFace checkpoint names, to and from safetensors. MTP module k is stored as
// model.layers.{num_hidden_layers + k}.* with copies of the shared embedding and head, as DeepSeek-V3 files are.
#pragma once

#include <torch/torch.h>

#include <map>
#include <string>

#include "model/safetensors.h"
#include "model/transformer.h"

namespace dsopen::model {

// The weights of an HF model directory: model.safetensors, or model-0000K-of-0000N.safetensors shards listed by
// model.safetensors.index.json (a shard the index names but the directory lacks is an error naming both).
class WeightFiles {
public:
  explicit WeightFiles(const std::string& dir);
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return where_.count(name) > 0; }
  std::vector<int64_t> shape(const std::string& name) const;
  torch::Tensor tensor(const std::string& name) const;  // views the mapped file
  void release(const std::string& name) const;         // SafetensorsFile::release of the file holding it
  const std::string& path() const { return path_; }     // the index or the single file (for messages)

private:
  std::string path_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;  // tensor name -> file
};

// name -> tensor (parameters and persistent buffers), HF names. LoRA adapters are not part of it (see model/lora.h).
std::map<std::string, torch::Tensor> hf_state_dict(CausalLM& model);

// Copies the weights into the model (converting F32/F16/BF16 to the model's dtype). Missing, unexpected or
// mis-shaped tensors are reported together (name, expected and found shape); `strict` = false tolerates unexpected
// ones. MTP layers of the file are skipped when the model runs without MTP.
// With `fresh_mtp`, MTP modules the file lacks keep their initialization (fine-tuning with MTP from a checkpoint
// that has none); the number of such tensors is returned.
int64_t load_hf_state_dict(CausalLM& model, const WeightFiles& weights, bool strict = true, bool fresh_mtp = false);

// Writes an HF model directory: config.json and model.safetensors, or shards of at most `max_shard_bytes` with
// model.safetensors.index.json; `dtype` converts floating-point tensors (kFloat32 keeps them).
void save_hf_model(CausalLM& model, const std::string& dir, torch::Dtype dtype = torch::kFloat32,
                   int64_t max_shard_bytes = int64_t{5} << 30);

}  // namespace dsopen::model
