// Loading a model for inference from a directory: a dsopen checkpoint (step_*/) or a HuggingFace model directory
// (config.json + model.safetensors).
#pragma once

#include <string>

#include "model/transformer.h"

namespace dsopen::inference {

// Builds the model from DIR/config.json and loads DIR/model.safetensors (strict). MTP layers in the file are
// ignored (inference does not use them). Runtime errors name the file at fault.
// `keep_mtp` builds and loads the MTP modules when the file has them (for exporting); inference leaves them out.
model::CausalLM load_model(const std::string& dir, torch::Device device = torch::kCPU, bool keep_mtp = false);

}  // namespace dsopen::inference
