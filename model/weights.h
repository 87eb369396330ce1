// The model's weights under HuggingFace checkpoint names, to and from safetensors. MTP module k is stored as
// model.layers.{num_hidden_layers + k}.* with copies of the shared embedding and head, as DeepSeek-V3 files are.
#pragma once

#include <torch/torch.h>

#include <map>
#include <string>

#include "model/safetensors.h"
#include "model/transformer.h"

namespace dsopen::model {

// name -> tensor (parameters and persistent buffers), HF names.
std::map<std::string, torch::Tensor> hf_state_dict(CausalLM& model);

// Copies tensors from `file` into the model (converting dtype). Missing, unexpected or mis-shaped tensors are
// reported together (name, expected and found shape); `strict` = false tolerates unexpected ones.
void load_hf_state_dict(CausalLM& model, const SafetensorsFile& file, bool strict = true);

}  // namespace dsopen::model
