// The quantized-weight formats dsopen-quantize writes and every loader reads: one definition below the algorithms
// (inference/quantize.h) and the kernels (inference/quantized_linear.h). docs/CHECKPOINTS.md, "Quantized models",
// describes them for users.
//
// Written: the GPTQ checkpoint layout that AutoGPTQ / GPTQModel, transformers + optimum, vLLM and ExLlama read
// (checkpoint_format "gptq"). Every quantized Linear <layer> stores, instead of <layer>.weight:
//   <layer>.qweight  int32 [in * bits / 32, out]  codes packed along the input: word r of column o holds inputs
//                                                 r * 32/bits ... + 32/bits - 1, the first in the lowest bits
//   <layer>.qzeros   int32 [G, out * bits / 32]   zero points minus one (the "gptq" v1 convention; "gptq_v2"
//                                                 files store them as they are), packed along the output the same way
//   <layer>.scales   float16 [G, out]             per-group step (float32 with --scale-dtype fp32)
//   <layer>.g_idx    int32 [in]                   group of each input column (i / g unless act-order regrouped)
//   dequantized weight: W[o, i] = (q[i, o] - zero[g_idx[i], o]) * scales[g_idx[i], o]
// G = in / g groups; group_size -1 is one group per layer (g = in). config.json's quantization_config (and
// quantize_config.json) holds {quant_method "gptq", bits, group_size, sym, desc_act, static_groups,
// checkpoint_format, lm_head, meta {quantizer, method}}. Zero points are >= 1 so that zero - 1 fits the code bits.
//
// Read as well, with a deprecation warning: dsopen's earlier layout (<layer>.qweight uint8 [out, in] or nibbles
// [out, in / 2], <layer>.scales / <layer>.zeros [out, in / g], the quantization in the safetensors __metadata__).
#pragma once

#include <torch/torch.h>

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "model/weights.h"

namespace dsopen::inference {

// --group-size -1: one group spanning each layer's whole input dimension (per-channel scales).
inline constexpr int64_t kPerChannel = -1;
// The group size of a layer with `in` inputs: g itself, or `in` for kPerChannel.
inline int64_t layer_group_size(int64_t in, int64_t g) { return g == kPerChannel ? in : g; }

// A quantized layer in memory (the kernels' layout): codes row by row, group parameters per output row.
struct QuantizedWeight {
  torch::Tensor qweight;  // uint8 [out, in] (8 bits) or [out, in / 2] (4 bits: low nibble = even column)
  torch::Tensor scales;   // [out, G] float16 or float32
  torch::Tensor zeros;    // [out, G] same dtype as scales, in code units
  int bits = 8;
  int64_t group_size = 128;  // this layer's (never kPerChannel)
  int64_t in_features = 0;
  torch::Tensor g_idx;  // int64 [in]: each column's group, only when it is not i / group_size (act-order files of
                        // other tools); such layers are dequantized, never given to a kernel
};

// Packs codes 0..15 [out, in] (in even) into uint8 [out, in / 2]: low nibble = even column, high = odd column.
torch::Tensor pack_int4(const torch::Tensor& codes);
// Inverse of pack_int4: uint8 [out, in / 2] -> uint8 [out, in].
torch::Tensor unpack_int4(const torch::Tensor& packed);

// Throws a usage error naming --group-size, `layer` and its dimensions unless g > 0 divides `in` or g is
// kPerChannel (and, for int4, `in` is even).
void check_group_size(int64_t in, int64_t g, int bits, const std::string& layer);

// Float32 [out, in] weight the quantized layer stands for.
torch::Tensor dequantize(const QuantizedWeight& q);

// The quantization a model directory declares.
struct QuantizationMeta {
  bool legacy = false;       // dsopen's earlier layout (metadata in the safetensors header)
  std::string quant_method;  // "gptq" (legacy: "rtn" | "gptq")
  int bits = 0;              // 4 | 8
  int64_t group_size = 0;    // > 0 or kPerChannel
  bool zeros_minus_one = true;  // checkpoint_format "gptq" (v1); false for "gptq_v2"
};
// What `config_json` (quantization_config) or, for the earlier layout, the safetensors metadata of `files`
// declares; nothing for float weights. Runtime errors name the file and the field when it is malformed or asks
// for what the loaders cannot read (bits other than 4 and 8, another checkpoint_format).
std::optional<QuantizationMeta> read_quantization_meta(const model::WeightFiles& files, const std::string& config_json);

// A layer in the GPTQ checkpoint layout (the tensors named above, without the layer prefix).
struct GptqTensors {
  torch::Tensor qweight, qzeros, scales, g_idx;
};
// Usage error naming `layer` when `in` or `out` do not fill whole 32-bit words (multiples of 32 / bits) or a zero
// point is 0 (v1 cannot store it).
GptqTensors to_gptq_layout(const QuantizedWeight& q, const std::string& layer);
// quantization_config of the GPTQ layout dsopen-quantize writes.
nlohmann::json gptq_quantization_config(int bits, int64_t group_size, bool sym, bool act_order, bool lm_head,
                                        const std::string& method, double damp_percent);

// The file tensors of quantized layer `base` in `meta`'s layout.
std::vector<std::string> quantized_tensor_names(const std::string& base, const QuantizationMeta& meta);
// The quantized tensors of layer `base` (weight [out, in]) in memory layout, checked against the file layout;
// nothing, with `problem` set, when they are absent or do not match.
std::optional<QuantizedWeight> read_quantized_weight(const model::WeightFiles& files, const std::string& base,
                                                     int64_t out, int64_t in, const QuantizationMeta& meta,
                                                     std::string& problem);

}  // namespace dsopen::inference
