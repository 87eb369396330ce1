#include "inference/quantized_format.h"

#include <spdlog/spdlog.h>

#include "utils/env.h"
#include "utils/errors.h"
#include "utils/json.h"

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
  if (g < 1 && g != kPerChannel) throw usage_error("--group-size", std::to_string(g) + " is not a group size",
                                                   "give a size >= 1 that divides every layer's input, or -1 for one "
                                                   "group per row");
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
  if (q.g_idx.defined()) {  // groups in any order: each column's own scale and zero
    auto s = q.scales.to(torch::kFloat32).index_select(1, q.g_idx), z = q.zeros.to(torch::kFloat32).index_select(1, q.g_idx);
    return (codes.to(torch::kFloat32) - z) * s;
  }
  const int64_t G = in / q.group_size;
  auto c = codes.to(torch::kFloat32).reshape({out, G, q.group_size});
  auto s = q.scales.to(torch::kFloat32).unsqueeze(2), z = q.zeros.to(torch::kFloat32).unsqueeze(2);
  return ((c - z) * s).reshape({out, in});
}

namespace {

// Packs codes [rows, n] (values < 2^bits) along dim 1 into int32 words [rows, n * bits / 32], first value lowest.
torch::Tensor pack_words(const torch::Tensor& codes, int bits) {
  const int64_t per = 32 / bits, rows = codes.size(0), n = codes.size(1);
  auto c = codes.to(torch::kInt64).reshape({rows, n / per, per});
  auto shifts = torch::arange(per, torch::kInt64).mul(bits);
  auto words = c.bitwise_left_shift(shifts).sum(2);  // < 2^32 in int64; stored as int32's bit pattern
  return torch::where(words >= (int64_t(1) << 31), words - (int64_t(1) << 32), words).to(torch::kInt32);
}

// Inverse of pack_words: int32 [rows, w] -> int64 [rows, w * 32 / bits].
torch::Tensor unpack_words(const torch::Tensor& words, int bits) {
  const int64_t per = 32 / bits;
  auto w = words.to(torch::kInt64).bitwise_and(0xFFFFFFFFLL).unsqueeze(2);  // unsigned view
  auto shifts = torch::arange(per, torch::kInt64).mul(bits);
  return w.bitwise_right_shift(shifts).bitwise_and((1 << bits) - 1).reshape({words.size(0), words.size(1) * per});
}

}  // namespace

GptqTensors to_gptq_layout(const QuantizedWeight& q, const std::string& layer) {
  const int64_t per = 32 / q.bits;
  auto codes = q.bits == 4 ? unpack_int4(q.qweight) : q.qweight;  // [out, in]
  const int64_t out = codes.size(0), in = codes.size(1);
  if (in % per != 0 || out % per != 0)
    throw usage_error(layer, "[" + std::to_string(out) + ", " + std::to_string(in) + "] does not pack into the GPTQ " +
                                 "layout: both dimensions must be multiples of " + std::to_string(per) + " at " +
                                 std::to_string(q.bits) + " bits",
                      "leave this layer out (it is lm_head: drop --quantize-head) or use another model size");
  auto zeros = q.zeros.to(torch::kFloat32).round().to(torch::kInt64);  // [out, G]
  if (zeros.min().item<int64_t>() < 1)
    throw usage_error(layer, "a zero point of 0 cannot be stored in the GPTQ (v1) layout", "quantize again");
  GptqTensors t;
  // Words run along the input: pack each output row's codes, then put the input (words) first.
  t.qweight = pack_words(codes.contiguous(), q.bits).t().contiguous();  // [out, in / per] -> [in / per, out]
  t.qzeros = pack_words((zeros - 1).t().contiguous(), q.bits);          // [G, out / per]
  t.scales = q.scales.t().contiguous();                                  // [G, out]
  t.g_idx = q.g_idx.defined() ? q.g_idx.to(torch::kInt32)
                              : torch::arange(in, torch::kInt64).div(q.group_size, "floor").to(torch::kInt32);
  return t;
}

nlohmann::json gptq_quantization_config(int bits, int64_t group_size, bool sym, bool act_order, bool lm_head,
                                        const std::string& method, double damp_percent) {
  nlohmann::json c = {{"quant_method", "gptq"},
                       {"bits", bits},
                       {"group_size", group_size},
                       {"sym", sym},
                       {"desc_act", act_order},
                       // act-order here keeps each group's columns together (g_idx is i / g): the groups are static
                       {"static_groups", act_order},
                       {"checkpoint_format", "gptq"},
                       {"lm_head", lm_head},
                       {"meta", {{"quantizer", {"dsopen"}}, {"method", method}}}};
  if (method == "gptq") {  // GPTQ's own settings; rounding to nearest has none
    c["true_sequential"] = true;
    c["damp_percent"] = damp_percent;
  }
  return c;
}

std::optional<QuantizationMeta> read_quantization_meta(const model::WeightFiles& files, const std::string& config_json) {
  const auto& meta = files.metadata();
  if (meta.count("quant_method")) {  // the earlier layout
    QuantizationMeta q;
    q.legacy = true;
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
    spdlog::warn("{}: dsopen's earlier quantized layout (qweight/scales/zeros); it still loads, but run dsopen-quantize "
                 "again for the standard GPTQ layout that other tools read", files.path());
    return q;
  }
  if (config_json.empty()) return std::nullopt;
  const auto j = json::parse(env::read_file(config_json), config_json);
  if (!j.is_object() || !j.contains("quantization_config") || j["quantization_config"].is_null()) return std::nullopt;
  const auto& c = j["quantization_config"];
  const std::string where = config_json + ": quantization_config";
  auto field = [&](const char* key) -> const nlohmann::json& {
    if (!c.is_object() || !c.contains(key)) throw runtime_error(where, std::string("'") + key + "' is missing");
    return c[key];
  };
  QuantizationMeta q;
  q.quant_method = field("quant_method").is_string() ? field("quant_method").get<std::string>() : "";
  if (q.quant_method != "gptq") throw runtime_error(where, "quant_method must be \"gptq\"");
  if (!field("bits").is_number_integer() || !field("group_size").is_number_integer())
    throw runtime_error(where, "'bits' and 'group_size' must be integers");
  q.bits = field("bits").get<int>();
  q.group_size = field("group_size").get<int64_t>();
  if ((q.bits != 4 && q.bits != 8) || (q.group_size <= 0 && q.group_size != kPerChannel))
    throw runtime_error(where, "unsupported quantization: bits " + std::to_string(q.bits) + ", group size " +
                                   std::to_string(q.group_size),
                        "dsopen loads 4- and 8-bit GPTQ with group_size > 0 or -1");
  if (c.contains("checkpoint_format") && !c["checkpoint_format"].is_string())
    throw runtime_error(where, "'checkpoint_format' must be a string (\"gptq\" or \"gptq_v2\")");
  const std::string format = c.contains("checkpoint_format") ? c["checkpoint_format"].get<std::string>() : "gptq";
  if (format != "gptq" && format != "gptq_v2")
    throw runtime_error(where, "checkpoint_format '" + format + "' is not gptq or gptq_v2",
                        "convert it with the tool that wrote it");
  q.zeros_minus_one = format == "gptq";
  return q;
}

std::vector<std::string> quantized_tensor_names(const std::string& base, const QuantizationMeta& meta) {
  if (meta.legacy) return {base + ".qweight", base + ".scales", base + ".zeros"};
  return {base + ".qweight", base + ".qzeros", base + ".scales", base + ".g_idx"};
}

std::optional<QuantizedWeight> read_quantized_weight(const model::WeightFiles& files, const std::string& base,
                                                     int64_t out, int64_t in, const QuantizationMeta& meta,
                                                     std::string& problem) {
  if (!files.contains(base + ".qweight")) return std::nullopt;
  const int64_t g = layer_group_size(in, meta.group_size);
  if (meta.legacy) {
    const std::vector<int64_t> qshape = {out, meta.bits == 4 ? in / 2 : in}, gshape = {out, in / g};
    if (in % g != 0 || !files.contains(base + ".scales") || !files.contains(base + ".zeros") ||
        files.shape(base + ".qweight") != qshape || files.shape(base + ".scales") != gshape ||
        files.shape(base + ".zeros") != gshape) {
      problem = base + ": quantized tensors do not match " + shape_str({out, in}) + " (expected qweight " +
                shape_str(qshape) + ", scales/zeros " + shape_str(gshape) + ")";
      return std::nullopt;
    }
    if (!torch::isfinite(files.tensor(base + ".scales")).all().item<bool>() ||
        !torch::isfinite(files.tensor(base + ".zeros")).all().item<bool>()) {
      problem = base + ": scales or zeros hold NaN or infinite values";
      return std::nullopt;
    }
    return QuantizedWeight{files.tensor(base + ".qweight"), files.tensor(base + ".scales"),
                           files.tensor(base + ".zeros"), meta.bits, g, in, {}};
  }
  const int64_t per = 32 / meta.bits, G = (in + g - 1) / g;
  const std::vector<int64_t> qshape = {in / per, out}, zshape = {G, out / per}, sshape = {G, out}, ishape = {in};
  auto dtype_is = [&](const std::string& name, const char* want) { return files.dtype(name) == want; };
  const bool has_g_idx = files.contains(base + ".g_idx");
  if (in % per != 0 || out % per != 0 || !files.contains(base + ".qzeros") || !files.contains(base + ".scales") ||
      files.shape(base + ".qweight") != qshape || files.shape(base + ".qzeros") != zshape ||
      files.shape(base + ".scales") != sshape || !dtype_is(base + ".qweight", "I32") ||
      !dtype_is(base + ".qzeros", "I32") || !(dtype_is(base + ".scales", "F16") || dtype_is(base + ".scales", "F32")) ||
      (has_g_idx && (files.shape(base + ".g_idx") != ishape || !dtype_is(base + ".g_idx", "I32")))) {
    problem = base + ": GPTQ tensors do not match " + shape_str({out, in}) + " at " + std::to_string(meta.bits) +
              " bits, group size " + std::to_string(g) + " (expected qweight I32 " + shape_str(qshape) + ", qzeros I32 " +
              shape_str(zshape) + ", scales F16 " + shape_str(sshape) + ", g_idx I32 " + shape_str(ishape) + ")";
    return std::nullopt;
  }
  QuantizedWeight q;
  q.bits = meta.bits;
  q.group_size = g;
  q.in_features = in;
  auto codes = unpack_words(files.tensor(base + ".qweight").t().contiguous(), meta.bits);  // [out, in]
  q.qweight = meta.bits == 4 ? pack_int4(codes) : codes.to(torch::kUInt8).contiguous();
  auto zeros = unpack_words(files.tensor(base + ".qzeros"), meta.bits);  // [G, out]
  if (meta.zeros_minus_one) zeros = zeros.add(1);
  const auto scales = files.tensor(base + ".scales");
  if (!torch::isfinite(scales).all().item<bool>()) {
    problem = base + ".scales: holds NaN or infinite values";
    return std::nullopt;
  }
  q.scales = scales.t().contiguous();
  q.zeros = zeros.t().to(scales.scalar_type()).contiguous();
  if (has_g_idx) {
    auto g_idx = files.tensor(base + ".g_idx").to(torch::kInt64);
    if (g_idx.numel() && (g_idx.min().item<int64_t>() < 0 || g_idx.max().item<int64_t>() >= G)) {
      problem = base + ".g_idx: a group index outside 0.." + std::to_string(G - 1);
      return std::nullopt;
    }
    if (!torch::equal(g_idx, torch::arange(in, torch::kInt64).div(g, "floor"))) q.g_idx = g_idx;
  }
  if (!q.g_idx.defined() && in % g != 0) {
    problem = base + ": group size " + std::to_string(g) + " does not divide the input dimension " + std::to_string(in);
    return std::nullopt;
  }
  return q;
}

}  // namespace dsopen::inference
