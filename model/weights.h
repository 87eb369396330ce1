// The model's weights under HuggingFace checkpoint names, to and from safetensors. MTP module k is stored as
// model.layers.{num_hidden_layers + k}.* with copies of the shared embedding and head, as DeepSeek-V3 files are.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <map>
#include <string>
#include <vector>

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
  std::string dtype(const std::string& name) const;  // the safetensors dtype name ("F32", "I32", ...)
  torch::Tensor tensor(const std::string& name) const;  // views the mapped file
  void release(const std::string& name) const;         // SafetensorsFile::release of the file holding it
  const std::string& path() const { return path_; }     // the index or the single file (for messages)
  std::vector<std::string> files() const;              // the safetensors files, as opened
  // The __metadata__ of the (first) file: every shard dsopen writes carries the same. (A WeightFiles always holds
  // at least one file: an index naming none is refused.)
  const std::map<std::string, std::string>& metadata() const { return files_.front()->metadata(); }

private:
  std::string path_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;  // tensor name -> file
};

// name -> tensor (parameters and persistent buffers), HF names. LoRA adapters are not part of it (see model/lora.h).
std::map<std::string, torch::Tensor> hf_state_dict(CausalLM& model);

// The HF names a parameter or buffer of the model is stored under: its own (MTP module k's mtp.k.* become
// model.layers.{L + k}.*), plus the MTP modules' copies of the shared embedding and head.
std::vector<std::string> hf_names_of(const CausalLMImpl& model, const std::string& module_name);

// What a hook says about a model tensor the files do not hold under its own name (e.g. a quantized weight stored as
// qweight / scales / zeros, inference/quantized_format.h).
struct AlternateTensor {
  bool found = false;                 // the hook filled the tensor, or took charge of it
  std::vector<std::string> consumed;  // file tensors it read (so they are not "unexpected")
  std::string problem;                // set: reported with the loader's other problems
};
using AlternateTensorHook = std::function<AlternateTensor(const std::string& name, torch::Tensor& target,
                                                          const WeightFiles& files)>;

struct LoadOptions {
  bool strict = true;      // tensors of the files the model does not have are errors (MTP layers excepted)
  bool fresh_mtp = false;  // MTP modules the files lack keep their initialization (fine-tuning with MTP added)
  AlternateTensorHook alternate;
};

// The one weight loader (training, evaluation, generation, conversion, quantization): copies the weights into
// the model, converting F32/F16/BF16 to the model's dtype. Missing, unexpected and mis-shaped tensors are
// reported together (name, expected and found shape) in one runtime error naming the file. MTP layers of the
// file are skipped when the model runs without MTP. Returns the number of MTP tensors left fresh.
int64_t load_hf_state_dict(CausalLM& model, const WeightFiles& weights, const LoadOptions& options);
inline int64_t load_hf_state_dict(CausalLM& model, const WeightFiles& weights, bool strict = true, bool fresh_mtp = false) {
  return load_hf_state_dict(model, weights, LoadOptions{strict, fresh_mtp, nullptr});
}

// Writes an HF model directory: config.json and model.safetensors, or shards of at most `max_shard_bytes` with
// model.safetensors.index.json; `dtype` converts floating-point tensors (kFloat32 keeps them). The files are built
// in a staging sibling (.<name>.partial-<pid>) and moved in only when all were written, so a failure leaves the
// directory as it was. Weight files an earlier save left there (other shards, an index of the other layout) are
// removed once the new ones are in, as transformers' save_pretrained does: a stale index would otherwise be what
// loaders read. Other files in the directory (tokenizer, README) are kept.
struct HfExportOptions {
  torch::Dtype dtype = torch::kFloat32;
  int64_t max_shard_bytes = int64_t{5} << 30;
  // The MTP module (DeepSeek-V3) is stored as model.layers.{num_hidden_layers}.*, as DeepSeek's files do; transformers
  // does not build it and reports those tensors as unexpected, so it is left out unless asked for.
  bool keep_mtp = false;
  std::map<std::string, std::string> files;  // more files for the directory (tokenizer, generation_config.json)
};
void save_hf_model(CausalLM& model, const std::string& dir, const HfExportOptions& options);
inline void save_hf_model(CausalLM& model, const std::string& dir, torch::Dtype dtype = torch::kFloat32,
                          int64_t max_shard_bytes = int64_t{5} << 30) {
  save_hf_model(model, dir, HfExportOptions{dtype, max_shard_bytes, false, {}});
}
// The staging behind save_hf_model, for any writer of a model directory: `write` fills the staging directory it is
// given and returns the names it wrote; they are moved into `dir` (created if needed) when it returns, weights
// before config.json, and stale weight files are removed. When `write` throws, the staging directory is removed and
// `dir` is untouched.
void write_staged(const std::string& dir, const std::function<std::vector<std::string>(const std::string&)>& write);

// The name of HF weight shard k (0-based) of n: model-0000{k+1}-of-0000{n}.safetensors.
std::string shard_file_name(int64_t k, int64_t n);

// Removes model*.safetensors files and model.safetensors.index.json of `dir` that are not in `written` (names).
void remove_stale_weights(const std::string& dir, const std::vector<std::string>& written);

}  // namespace dsopen::model
