// Loading a model for inference from a directory (model/model_dir.h: a dsopen checkpoint, a checkpoints directory
// or a HuggingFace model directory, single or sharded weights), float or quantized (inference/quantized_format.h),
// through the one weight loader of model/weights.h.
#pragma once

#include <string>

#include "model/transformer.h"

namespace dsopen::inference {

// How load_quantized_model holds the layers a weight-only kernel of quantized_linear.h takes (int4 with group 32,
// 64, 128 or 256; per-channel int8 with an input dimension divisible by 16). Other layers, kv_b_proj (whose matrix
// MLA decoding reads directly) and non-CPU devices are always dequantized.
enum class QuantizedLayers {
  Dequantized,  // float32 weights: what LoRA adapters and the reference comparisons need
  Kernels,      // codes kept (0.5 / 1 byte per weight), multiplied through the kernels (int4: every row count;
                // int8: up to 64 rows, more through the weight dequantized for the call): decoding, serving
  FloatMath,    // codes kept; every call dequantizes into a reused float32 buffer: the Dequantized results at the
                // memory of Kernels (dsopen-eval)
};

// Builds the model from config.json and loads its weights (strict), float or quantized; eval mode, on `device`.
// MTP layers in the file are ignored (inference does not use them) unless `keep_mtp` (exporting). Runtime errors
// name the file at fault.
model::CausalLM load_model(const std::string& dir, torch::Device device = torch::kCPU, bool keep_mtp = false,
                           QuantizedLayers layers = QuantizedLayers::Dequantized);

// The same, spelled for quantized directories (a float directory loads as with load_model).
inline model::CausalLM load_quantized_model(const std::string& dir, torch::Device device = torch::kCPU,
                                            QuantizedLayers layers = QuantizedLayers::Dequantized) {
  return load_model(dir, device, false, layers);
}

}  // namespace dsopen::inference
