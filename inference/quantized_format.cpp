#include "inference/quantized_format.h"

#include "utils/errors.h"

namespace dsopen::inference {

namespace {
std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}
}  // namespace

torch::Tensor pack_int4(const torch::Tensor& codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.size(1) % 2 == 0, "pack_int4: codes must be [out, even in], got ",
              codes.sizes());
  auto c = codes.to(torch::kUInt8);
  auto even = c.slice(1, 0, c.size(1), 2).bitwise_and(0x0F);
  auto odd = c.slice(1, 1, c.size(1), 2).bitwise_and(0x0F);
  return even.bitwise_or(odd.bitwise_left_shift(4)).contiguous();
}

torch::Tensor unpack_int4(const torch::Tensor& packed) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == torch::kUInt8, "unpack_int4: expected uint8 [out, in/2]");
  auto low = packed.bitwise_and(0x0F);
  auto high = packed.bitwise_right_shift(4).bitwise_and(0x0F);
  return torch::stack({low, high}, 2).reshape({packed.size(0), packed.size(1) * 2});  // [out, in]
}

void check_group_size(int64_t in, int64_t g, int bits, const std::string& layer) {
  if (g == kPerChannel) g = in;
  if (g <= 0 || in % g != 0)
    throw usage_error("--group-size", std::to_string(g) + " does not divide the input dimension " + std::to_string(in) +
                                          " of " + layer,
                      "pick a group size that divides the input dimension of every quantized layer");
  if (bits == 4 && in % 2 != 0)
    throw usage_error(layer, "int4 packing needs an even input dimension, got " + std::to_string(in));
  if (bits != 4 && bits != 8) throw usage_error(layer, "bits must be 4 or 8, got " + std::to_string(bits));
}

torch::Tensor dequantize(const QuantizedWeight& q) {
  auto codes = q.bits == 4 ? unpack_int4(q.qweight) : q.qweight;  // [out, in]
  const int64_t out = codes.size(0), in = codes.size(1);
  TORCH_CHECK(in == q.in_features || q.in_features == 0, "dequantize: qweight holds ", in, " columns, expected ",
              q.in_features);
  const int64_t G = in / q.group_size;
  auto c = codes.to(torch::kFloat32).reshape({out, G, q.group_size});
  auto s = q.scales.to(torch::kFloat32).unsqueeze(2), z = q.zeros.to(torch::kFloat32).unsqueeze(2);
  return ((c - z) * s).reshape({out, in});
}

std::optional<QuantizationMeta> read_quantization_meta(const model::WeightFiles& files) {
  const auto& meta = files.metadata();
  if (!meta.count("quant_method")) return std::nullopt;
  QuantizationMeta q;
  q.quant_method = meta.at("quant_method");
  try {
    q.bits = std::stoi(meta.at("bits"));
    q.group_size = std::stoll(meta.at("group_size"));
  } catch (const std::exception&) {
    throw runtime_error(files.path(), "quantization metadata needs integer 'bits' and 'group_size'");
  }
  if ((q.bits != 4 && q.bits != 8) || (q.group_size <= 0 && q.group_size != kPerChannel))
    throw runtime_error(files.path(), "unsupported quantization: bits " + std::to_string(q.bits) + ", group size " +
                                          std::to_string(q.group_size));
  return q;
}

std::map<std::string, std::string> quantization_metadata(const QuantizationMeta& q) {
  return {{"format", "pt"}, {"quant_method", q.quant_method}, {"bits", std::to_string(q.bits)},
          {"group_size", std::to_string(q.group_size)}};
}

std::vector<std::string> quantized_tensor_names(const std::string& base) {
  return {base + ".qweight", base + ".scales", base + ".zeros"};
}

std::optional<QuantizedWeight> read_quantized_weight(const model::WeightFiles& files, const std::string& base,
                                                     int64_t out, int64_t in, const QuantizationMeta& meta,
                                                     std::string& problem) {
  if (!files.contains(base + ".qweight")) return std::nullopt;
  const int64_t g = layer_group_size(in, meta.group_size);
  const std::vector<int64_t> qshape = {out, meta.bits == 4 ? in / 2 : in}, gshape = {out, in / g};
  if (in % g != 0 || !files.contains(base + ".scales") || !files.contains(base + ".zeros") ||
      files.shape(base + ".qweight") != qshape || files.shape(base + ".scales") != gshape ||
      files.shape(base + ".zeros") != gshape) {
    problem = base + ": quantized tensors do not match " + shape_str({out, in}) + " (expected qweight " +
              shape_str(qshape) + ", scales/zeros " + shape_str(gshape) + ")";
    return std::nullopt;
  }
  return QuantizedWeight{files.tensor(base + ".qweight"), files.tensor(base + ".scales"), files.tensor(base + ".zeros"),
                         meta.bits, g, in};
}

}  // namespace dsopen::inference
