// The quantized-weight format dsopen-quantize writes and every loader reads: one definition below the
// algorithms (inference/quantize.h) and the kernels (inference/quantized_linear.h). docs/CHECKPOINTS.md,
// "Quantized models", describes it for users.
//
// Every quantized Linear <layer> stores, instead of <layer>.weight (other tensors keep their HF name and dtype):
//   <layer>.qweight  uint8 [out, in]       int8: code q in 0..255 per weight
//                    uint8 [out, in / 2]   int4: codes 0..15 packed two per byte, low nibble = even column,
//                                          high nibble = odd column
//   <layer>.scales   float16 [out, in / g] per-group step (float32 when quantized with --scale-dtype fp32)
//   <layer>.zeros    float16 [out, in / g] per-group zero point in code units (an integer 0..2^bits-1)
//   dequantized weight: W[o, i] = (q[o, i] - zeros[o, i / g]) * scales[o, i / g]
// __metadata__ {"format": "pt", "quant_method": "rtn" | "gptq", "bits": "8" | "4", "group_size": "128"};
// group_size -1 (as in GPTQ's configs) is one group per output row: g = in for every layer, scales [out, 1].
// config.json additionally carries "quantization_config" {quant_method, bits, group_size}.
#pragma once

#include <torch/torch.h>

#include <optional>
#include <string>
#include <vector>

#include "model/weights.h"

namespace dsopen::inference {

// --group-size -1: one group spanning each layer's whole input dimension (per-channel scales).
inline constexpr int64_t kPerChannel = -1;
// The group size of a layer with `in` inputs: g itself, or `in` for kPerChannel.
inline int64_t layer_group_size(int64_t in, int64_t g) { return g == kPerChannel ? in : g; }

struct QuantizedWeight {
  torch::Tensor qweight;  // uint8 [out, in] (8 bits) or [out, in / 2] (4 bits)
  torch::Tensor scales;   // [out, in / g] float16 or float32
  torch::Tensor zeros;    // [out, in / g] same dtype as scales
  int bits = 8;
  int64_t group_size = 128;  // this layer's (never kPerChannel)
  int64_t in_features = 0;
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

// The quantization a weights file declares.
struct QuantizationMeta {
  std::string quant_method;  // "rtn" | "gptq"
  int bits = 0;              // 4 | 8
  int64_t group_size = 0;    // > 0 or kPerChannel
};
// The metadata of `files`, or nothing for float weights; a runtime error naming the file when it is malformed.
std::optional<QuantizationMeta> read_quantization_meta(const model::WeightFiles& files);
// Metadata entries that declare `meta` (save side).
std::map<std::string, std::string> quantization_metadata(const QuantizationMeta& meta);

// The file tensors of quantized layer `base`.
std::vector<std::string> quantized_tensor_names(const std::string& base);
// The quantized tensors of layer `base` (weight [out, in]) as views of the mapped file, checked against the
// layout; nothing, with `problem` set, when they are absent or do not match.
std::optional<QuantizedWeight> read_quantized_weight(const model::WeightFiles& files, const std::string& base,
                                                     int64_t out, int64_t in, const QuantizationMeta& meta,
                                                     std::string& problem);

}  // namespace dsopen::inference
