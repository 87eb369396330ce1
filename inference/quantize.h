// Weight-only quantization: group-wise int8 / int4 (asymmetric, or symmetric as GPTQ's sym) by round-to-nearest and
// GPTQ, and writing a quantized model in the GPTQ layout of inference/quantized_format.h.
//
// Group parameters follow GPTQ's quantizer: the range [min(w, 0), max(w, 0)] of the group is split into
// 2^bits - 1 steps, zero = round(-min / scale). The scale is rounded *up* to its stored dtype before coding, so
// dequantization with the stored values reproduces exactly what was coded and |W - deq(W)| <= scale / 2.
// Bits per weight = bits + (16 + bits) / g with float16 scales and packed zeros (int4 g128: 4.16).
//
// GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
// Transformers"): quantizes columns one at a time and spreads each column's error over the columns not yet
// quantized using the upper Cholesky factor of H^-1, H = 2 X^T X / n. Model level: the inputs of every Linear
// are observed without touching the model through a thread-local at::RecordFunction callback on aten::linear
// (matching the Linear's weight tensor); decoder layers are quantized in order, each from inputs produced by the
// already-quantized layers before it.
#pragma once

#include <torch/torch.h>

#include <map>
#include <string>
#include <vector>

#include "inference/quantized_format.h"
#include "model/transformer.h"

namespace dsopen::inference {


// Group parameters of w [out, g]: scale and zero [out] float64 (the scale rounded up to a value of `dtype`).
// Asymmetric: zero >= 1 (the GPTQ v1 layout stores zero - 1). `sym`: GPTQ's symmetric grid, step 2 max|w| / maxq
// and zero 2^(bits - 1).
std::pair<torch::Tensor, torch::Tensor> group_params(const torch::Tensor& w, int bits, torch::Dtype dtype,
                                                     bool sym = false);

// Round-to-nearest quantization of W [out, in] (any float dtype), bits 4 or 8, group size g along `in`.
QuantizedWeight quantize_rtn(const torch::Tensor& W, int bits, int64_t g, const std::string& layer = "weight",
                             torch::Dtype scale_dtype = torch::kFloat16, bool sym = false);


// Running H = 2 / n * sum X^T X over calibration rows (float64 [in, in]), the form GPTQ uses.
struct HessianAccumulator {
  torch::Tensor H;
  int64_t rows = 0;
  void add(const torch::Tensor& x);  // x [..., in]
};

struct GptqOptions {
  double percdamp = 0.01;  // dampening: H += percdamp * mean(diag(H)) * I
  int64_t block_size = 128;
  bool act_order = true;   // quantize columns by descending diag(H)
  torch::Dtype scale_dtype = torch::kFloat16;
  bool sym = false;        // symmetric groups (also for rtn)
};

// GPTQ for one layer: W [out, in], H [in, in] (e.g. 2 X^T X). Dead columns (H[i, i] == 0: an input that was
// always zero) get H[i, i] = 1 and are rounded to nearest without spreading error (their weights are kept, not
// zeroed as the reference does, since they do not change the calibration loss either way). Group parameters are
// computed when the first column of a group is reached, from the error-updated weights of that group (with
// act-order: the group's original contiguous columns, so the stored layout needs no g_idx).
// Math in float64 on the CPU.
QuantizedWeight gptq_quantize_layer(const torch::Tensor& W, const torch::Tensor& H, int bits, int64_t g,
                                    const GptqOptions& o = {}, const std::string& layer = "weight");

// ---- whole models ---------------------------------------------------------------------------------------------

struct QuantMethod {
  std::string quant_method;  // "rtn" | "gptq"
  int bits = 8;
};
// "rtn-int8" | "rtn-int4" | "gptq-int4"; anything else is a usage error naming --method and listing methods.
QuantMethod parse_method(const std::string& method);

struct QuantizeOptions {
  std::string method = "rtn-int8";
  int64_t group_size = 128;  // or kPerChannel
  bool quantize_head = false;  // lm_head too (the embedding always stays in float)
  GptqOptions gptq;
};

struct QuantizedModel {
  QuantMethod method;
  int64_t group_size = 128;  // as requested (kPerChannel stays -1); each layer's own is in its QuantizedWeight
  std::map<std::string, QuantizedWeight> layers;  // HF module name (e.g. model.layers.0.mlp.up_proj) -> weight
  std::map<std::string, int64_t> calibration_rows;  // gptq: rows seen by each layer (0: fell back to RTN)
};

// Names of the Linear modules that get quantized: every nn::Linear whose name ends in _proj (MTP modules
// excluded), plus lm_head with quantize_head.
std::vector<std::string> quantizable_linears(model::CausalLM& m, bool quantize_head);

// Quantizes the model's Linear weights. `calibration`: [B, T] int64 token batches, required for gptq (usage
// error otherwise). With gptq the model's weights are replaced by their dequantized values as layers are
// done (later layers are calibrated on quantized predecessors); rtn leaves the model unchanged.
QuantizedModel quantize_model(model::CausalLM& m, const QuantizeOptions& o,
                              const std::vector<torch::Tensor>& calibration = {});

// Up to `samples` sequences of `seq_len` tokens spread evenly over token shards, in batches of 8 ([B, T] int64):
// GPTQ's calibration data. A runtime error naming --calib-data when the shards hold no such sequence, or
// (`tokenizer_hash` set: the model's tokenizer) were made by another tokenizer.
std::vector<torch::Tensor> calibration_batches(const std::vector<std::string>& shards, int64_t samples, int64_t seq_len,
                                               int64_t vocab, const std::string& tokenizer_hash = "");

// Writes DIR/model.safetensors in the GPTQ layout (inference/quantized_format.h), DIR/config.json with its
// quantization_config, DIR/quantize_config.json and `files`. `o` supplies what the config records (sym,
// act-order, damping). A usage error naming the layer, before anything is written, when a layer does not
// pack into 32-bit words.
void save_quantized_model(model::CausalLM& m, const QuantizedModel& q, const std::string& dir,
                          const std::map<std::string, std::string>& files = {}, const QuantizeOptions& o = {});

// ---- sizes ----------------------------------------------------------------------------------------------------

// Storage bits per quantized weight: bits + (bits of the scale dtype + bits of the zero) / g (the int32 g_idx adds
// 32 / out more).
double bits_per_weight(int bits, int64_t g, torch::Dtype scale_dtype = torch::kFloat16);

struct SizeReport {
  int64_t params = 0;              // all parameters of the model (HF state dict)
  int64_t quantized_params = 0;    // weights of the quantized layers
  int64_t bytes_before = 0;        // the state dict as float32
  int64_t bytes_before_16bit = 0;  // the same in bf16 / fp16
  int64_t bytes_after = 0;         // quantized tensors + the rest in float32
  int64_t bytes_after_16bit = 0;   // quantized tensors + the rest in 16 bits
  double bits_per_weight = 0;      // of the quantized layers, measured from their tensors
  // DeepSeek-LLM 7B (6.91e9 parameters, embedding and head 102400 x 4096 each): all weights at bits_per_weight,
  // and the realistic layout with embedding and head kept in 16 bits.
  double projected_7b_bytes_all = 0;
  double projected_7b_bytes = 0;
};
SizeReport size_report(model::CausalLM& m, const QuantizedModel& q);

}  // namespace dsopen::inference
