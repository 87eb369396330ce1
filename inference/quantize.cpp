// Weight-only quantization (see quantize.h for the layout and the algorithms' sources).
#include "inference/quantize.h"

#include <ATen/record_function.h>
#include <nlohmann/json.hpp>

#include <cmath>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <cstring>
#include <filesystem>
#include <set>
#include <unordered_map>

#include "inference/loader.h"
#include "inference/quantized_linear.h"
#include "model/safetensors.h"
#include "model/weights.h"
#include "utils/env.h"
#include "utils/compat.h"
#include "utils/errors.h"
#include "utils/logging.h"

namespace fs = std::filesystem;

namespace dsopen::inference {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string shape_str(c10::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// Smallest value of `dtype` (float16 or float32) >= each positive float64 x, returned as float64.
torch::Tensor round_up_to(const torch::Tensor& x, torch::Dtype dtype) {
  const auto int_type = dtype == torch::kFloat16 ? torch::kInt16 : torch::kInt32;
  auto r = x.to(dtype);
  auto low = r.to(torch::kFloat64) < x;
  // For positive finite floats the next representable value up is the next bit pattern.
  auto bumped = (r.view(int_type) + 1).view(dtype);
  return torch::where(low, bumped, r).to(torch::kFloat64);
}

// Codes of w [out, k] for per-row scale/zero [out] (float64).
torch::Tensor quantize_codes(const torch::Tensor& w, const torch::Tensor& scale, const torch::Tensor& zero, int bits) {
  const double maxq = (1 << bits) - 1;
  return (torch::round(w / scale.unsqueeze(1)) + zero.unsqueeze(1)).clamp(0, maxq);
}

}  // namespace

// ---- packing and groups ---------------------------------------------------------------------------------------

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

std::pair<torch::Tensor, torch::Tensor> group_params(const torch::Tensor& w, int bits, torch::Dtype dtype) {
  const double maxq = (1 << bits) - 1;
  auto wd = w.to(torch::kFloat64);
  auto mn = wd.amin(1).clamp_max(0.0);  // [out]; the range always holds 0 so that zero is a code
  auto mx = wd.amax(1).clamp_min(0.0);
  auto flat = (mn == 0) & (mx == 0);
  mn = torch::where(flat, torch::full_like(mn, -1.0), mn);
  mx = torch::where(flat, torch::full_like(mx, 1.0), mx);
  auto scale = round_up_to((mx - mn) / maxq, dtype);
  auto zero = torch::round(-mn / scale).clamp(0, maxq);
  return {scale, zero};
}

QuantizedWeight quantize_rtn(const torch::Tensor& W, int bits, int64_t g, const std::string& layer,
                             torch::Dtype scale_dtype) {
  TORCH_CHECK(W.dim() == 2, "quantize_rtn: ", layer, " must be 2-D, got ", W.sizes());
  const int64_t out = W.size(0), in = W.size(1);
  check_group_size(in, g, bits, layer);
  g = layer_group_size(in, g);
  const int64_t G = in / g;
  auto wg = W.detach().to(torch::kCPU, torch::kFloat64).reshape({out * G, g});  // rows = (o, group)
  auto [scale, zero] = group_params(wg, bits, scale_dtype);
  auto codes = quantize_codes(wg, scale, zero, bits).to(torch::kUInt8).reshape({out, in});
  QuantizedWeight q;
  q.qweight = bits == 4 ? pack_int4(codes) : codes.contiguous();
  q.scales = scale.reshape({out, G}).to(scale_dtype);
  q.zeros = zero.reshape({out, G}).to(scale_dtype);
  q.bits = bits;
  q.group_size = g;
  q.in_features = in;
  return q;
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

// ---- GPTQ -----------------------------------------------------------------------------------------------------

void HessianAccumulator::add(const torch::Tensor& x) {
  auto x2 = x.detach().reshape({-1, x.size(-1)}).to(torch::kCPU, torch::kFloat64);  // [m, in]
  const int64_t m = x2.size(0);
  if (m == 0) return;
  if (!H.defined()) H = torch::zeros({x2.size(1), x2.size(1)}, torch::kFloat64);
  H.mul_(static_cast<double>(rows) / static_cast<double>(rows + m));
  rows += m;
  x2 = x2 * std::sqrt(2.0 / static_cast<double>(rows));
  H.addmm_(x2.t(), x2);
}

QuantizedWeight gptq_quantize_layer(const torch::Tensor& W, const torch::Tensor& H_in, int bits, int64_t g,
                                    const GptqOptions& o, const std::string& layer) {
  TORCH_CHECK(W.dim() == 2, "gptq: ", layer, " must be 2-D, got ", W.sizes());
  const int64_t out = W.size(0), in = W.size(1);
  check_group_size(in, g, bits, layer);
  g = layer_group_size(in, g);
  if (H_in.dim() != 2 || H_in.size(0) != in || H_in.size(1) != in)
    throw runtime_error(layer, "Hessian is " + shape_str(H_in.sizes()) + ", expected [" + std::to_string(in) + ", " +
                                   std::to_string(in) + "]");
  const double maxq = (1 << bits) - 1;
  torch::NoGradGuard no_grad;
  auto Wd = W.detach().to(torch::kCPU, torch::kFloat64).clone();  // [out, in]
  auto H = H_in.to(torch::kCPU, torch::kFloat64).clone();          // [in, in]
  auto diag = H.diagonal();
  diag.masked_fill_(diag == 0, 1.0);  // dead inputs: decoupled, rounded to nearest

  torch::Tensor perm = o.act_order ? std::get<1>(torch::sort(diag, /*stable=*/true, /*dim=*/0, /*descending=*/true))
                                   : torch::arange(in, torch::kLong);
  auto invperm = torch::argsort(perm);
  auto Wp = Wd.index_select(1, perm);                    // columns in quantization order
  auto Hp = H.index_select(0, perm).index_select(1, perm);
  Hp.diagonal().add_(o.percdamp * Hp.diagonal().mean().item<double>());
  auto [L, info] = torch::linalg_cholesky_ex(Hp);
  if (info.item<int64_t>() != 0)
    throw runtime_error(layer, "the dampened Hessian is not positive definite",
                        "use more calibration data or a larger dampening");
  auto U = torch::linalg_cholesky(torch::cholesky_inverse(L), /*upper=*/true);  // upper Cholesky factor of H^-1

  const int64_t G = in / g;
  auto scales = torch::zeros({out, G}, torch::kFloat64), zeros = torch::zeros({out, G}, torch::kFloat64);
  std::vector<bool> group_ready(static_cast<size_t>(G), false);
  auto codes = torch::zeros({out, in}, torch::kFloat64);  // quantization order
  const auto perm_acc = perm.accessor<int64_t, 1>();
  const int64_t bs = std::max<int64_t>(1, o.block_size);

  for (int64_t i1 = 0; i1 < in; i1 += bs) {
    const int64_t i2 = std::min(i1 + bs, in), count = i2 - i1;
    auto W1 = Wp.slice(1, i1, i2).clone();  // [out, count], error-updated inside the block
    auto Err1 = torch::zeros({out, count}, torch::kFloat64);
    auto U1 = U.slice(0, i1, i2).slice(1, i1, i2);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t grp = perm_acc[i1 + i] / g;
      if (!group_ready[static_cast<size_t>(grp)]) {
        // Current (error-updated) values of the group's columns: Wp plus the updates of this block so far.
        auto pos = invperm.slice(0, grp * g, (grp + 1) * g);
        auto cur = Wp.index_select(1, pos);
        if (i > 0) cur = cur - Err1.slice(1, 0, i).mm(U.slice(0, i1, i1 + i).index_select(1, pos));
        auto [s, z] = group_params(cur, bits, o.scale_dtype);
        scales.select(1, grp).copy_(s);
        zeros.select(1, grp).copy_(z);
        group_ready[static_cast<size_t>(grp)] = true;
      }
      auto w = W1.select(1, i);  // [out]
      auto s = scales.select(1, grp), z = zeros.select(1, grp);
      auto q = (torch::round(w / s) + z).clamp(0, maxq);
      codes.select(1, i1 + i).copy_(q);
      auto err = (w - (q - z) * s) / U1[i][i];  // [out]
      W1.slice(1, i).sub_(err.unsqueeze(1) * U1[i].slice(0, i).unsqueeze(0));
      Err1.select(1, i).copy_(err);
    }
    if (i2 < in) Wp.slice(1, i2).sub_(Err1.mm(U.slice(0, i1, i2).slice(1, i2)));
  }

  auto c = codes.index_select(1, invperm).to(torch::kUInt8);  // original column order
  QuantizedWeight q;
  q.qweight = bits == 4 ? pack_int4(c) : c.contiguous();
  q.scales = scales.to(o.scale_dtype);
  q.zeros = zeros.to(o.scale_dtype);
  q.bits = bits;
  q.group_size = g;
  q.in_features = in;
  return q;
}

// ---- whole models ---------------------------------------------------------------------------------------------

QuantMethod parse_method(const std::string& method) {
  if (method == "rtn-int8") return {"rtn", 8};
  if (method == "rtn-int4") return {"rtn", 4};
  if (method == "gptq-int4") return {"gptq", 4};
  throw usage_error("--method", "'" + method + "' is not a quantization method", "use rtn-int8, rtn-int4 or gptq-int4");
}

namespace {

std::vector<std::pair<std::string, model::LinearImpl*>> linears(model::CausalLM& m, bool quantize_head) {
  std::vector<std::pair<std::string, model::LinearImpl*>> out;
  for (const auto& item : m->named_modules("", /*include_self=*/false)) {
    const std::string& name = item.key();
    if (name.rfind("mtp.", 0) == 0) continue;
    auto* lin = item.value()->as<model::Linear>();
    if (!lin) continue;
    if (ends_with(name, "_proj") || (quantize_head && name == "lm_head")) out.emplace_back(name, lin);
  }
  return out;
}

// Calibration capture: while a CaptureScope lives, the inputs of this thread's matrix products with a target
// weight are added to that target's Hessian; the model is not modified. LibTorch's nn::Linear computes
// input.matmul(weight.t()) (or addmm(bias, input, weight.t()) for 2-D inputs with a bias), and aten::linear
// decomposes the same way, so an aten::t of a target weight marks the next aten::matmul / mm / addmm whose
// right operand views that weight's storage as the layer's call. Observed through at::RecordFunction callbacks.
using CaptureTargets = std::unordered_map<const c10::TensorImpl*, HessianAccumulator*>;
struct CaptureState {
  CaptureTargets* targets = nullptr;
  HessianAccumulator* pending = nullptr;  // set by aten::t of a target weight
  const void* pending_data = nullptr;
  int64_t pending_in = 0;
};
thread_local CaptureState tl_capture;

std::unique_ptr<at::ObserverContext> on_op_start(const at::RecordFunction& fn) {
  auto& st = tl_capture;
  if (!st.targets) return nullptr;
  const char* name = fn.name();
  if (std::strcmp(name, "aten::t") == 0) {
    auto inputs = fn.inputs();
    if (inputs.empty() || !inputs[0].isTensor()) return nullptr;
    const auto& w = inputs[0].toTensor();
    auto it = st.targets->find(w.unsafeGetTensorImpl());
    if (it == st.targets->end()) return nullptr;
    st.pending = it->second;
    st.pending_data = w.data_ptr();
    st.pending_in = w.size(1);
    return nullptr;
  }
  const bool addmm = std::strcmp(name, "aten::addmm") == 0;
  if (!st.pending || !(addmm || std::strcmp(name, "aten::matmul") == 0 || std::strcmp(name, "aten::mm") == 0))
    return nullptr;
  HessianAccumulator* acc = st.pending;
  st.pending = nullptr;  // the first product after the transpose decides
  auto inputs = fn.inputs();
  const size_t xi = addmm ? 1 : 0, wi = addmm ? 2 : 1;
  if (inputs.size() <= wi || !inputs[xi].isTensor() || !inputs[wi].isTensor()) return nullptr;
  const auto& wt = inputs[wi].toTensor();
  const auto& x = inputs[xi].toTensor();
  if (wt.dim() != 2 || wt.data_ptr() != st.pending_data || wt.size(0) != st.pending_in || x.size(-1) != st.pending_in)
    return nullptr;
  at::DisableRecordFunctionGuard off;  // the accumulation's own ops are not observed
  acc->add(x);
  return nullptr;
}

class CaptureScope {
public:
  explicit CaptureScope(CaptureTargets& targets) {
    tl_capture = CaptureState{};
    tl_capture.targets = &targets;
    handle_ = at::addThreadLocalCallback(
        at::RecordFunctionCallback(on_op_start).needsInputs(true).scopes({at::RecordScope::FUNCTION}));
  }
  ~CaptureScope() {
    at::removeCallback(handle_);
    tl_capture = CaptureState{};
  }
  CaptureScope(const CaptureScope&) = delete;
  CaptureScope& operator=(const CaptureScope&) = delete;

private:
  at::CallbackHandle handle_;
};

// "model.layers.3.mlp.up_proj" -> "model.layers.3"; anything else is its own stage (lm_head).
std::string stage_of(const std::string& name) {
  const std::string p = "model.layers.";
  if (name.rfind(p, 0) != 0) return name;
  return name.substr(0, name.find('.', p.size()));
}

}  // namespace

std::vector<std::string> quantizable_linears(model::CausalLM& m, bool quantize_head) {
  std::vector<std::string> names;
  for (const auto& [name, lin] : linears(m, quantize_head)) names.push_back(name);
  return names;
}

QuantizedModel quantize_model(model::CausalLM& m, const QuantizeOptions& o,
                              const std::vector<torch::Tensor>& calibration) {
  QuantizedModel result;
  result.method = parse_method(o.method);
  result.group_size = o.group_size;
  const int bits = result.method.bits;
  auto targets = linears(m, o.quantize_head);
  for (const auto& [name, lin] : targets) check_group_size(lin->weight.size(1), o.group_size, bits, name);
  torch::NoGradGuard no_grad;

  if (result.method.quant_method == "rtn") {
    for (const auto& [name, lin] : targets)
      result.layers[name] = quantize_rtn(lin->weight, bits, o.group_size, name, o.gptq.scale_dtype);
    return result;
  }

  if (calibration.empty())
    throw usage_error("--calib-data", "gptq-int4 needs calibration token sequences", "pass token shards with --calib-data");
  m->eval();
  // Stages in model order: each decoder layer, then the head; each stage is calibrated on the outputs of the
  // already-quantized stages before it.
  std::vector<std::string> stages;
  std::map<std::string, std::vector<std::pair<std::string, model::LinearImpl*>>> by_stage;
  for (const auto& t : targets) {
    const auto s = stage_of(t.first);
    if (!by_stage.count(s)) stages.push_back(s);
    by_stage[s].push_back(t);
  }
  for (const auto& stage : stages) {
    auto& layers = by_stage[stage];
    std::vector<HessianAccumulator> acc(layers.size());
    CaptureTargets capture;
    for (size_t k = 0; k < layers.size(); ++k) capture[layers[k].second->weight.unsafeGetTensorImpl()] = &acc[k];
    {
      CaptureScope scope(capture);
      for (const auto& ids : calibration) m->forward(ids.to(m->parameters().front().device()));
    }
    for (size_t k = 0; k < layers.size(); ++k) {
      const auto& [name, lin] = layers[k];
      result.calibration_rows[name] = acc[k].rows;
      QuantizedWeight q;
      if (acc[k].rows == 0) {  // e.g. a routed expert no calibration token reached
        spdlog::warn("{}: no calibration inputs reached this layer; rounding to nearest", name);
        q = quantize_rtn(lin->weight, bits, o.group_size, name, o.gptq.scale_dtype);
      } else {
        q = gptq_quantize_layer(lin->weight, acc[k].H, bits, o.group_size, o.gptq, name);
      }
      lin->weight.copy_(dequantize(q).to(lin->weight.options()));
      result.layers[name] = std::move(q);
    }
    spdlog::info("gptq: {} ({} layers) done", stage, layers.size());
  }
  return result;
}

void save_quantized_model(model::CausalLM& m, const QuantizedModel& q, const std::string& dir) {
  fs::create_directories(dir);
  auto tensors = model::hf_state_dict(m);
  for (const auto& [name, w] : q.layers) {
    tensors.erase(name + ".weight");
    tensors[name + ".qweight"] = w.qweight;
    tensors[name + ".scales"] = w.scales;
    tensors[name + ".zeros"] = w.zeros;
  }
  const std::map<std::string, std::string> meta = {{"format", "pt"},
                                                   {"quant_method", q.method.quant_method},
                                                   {"bits", std::to_string(q.method.bits)},
                                                   {"group_size", std::to_string(q.group_size)}};
  model::save_safetensors((fs::path(dir) / "model.safetensors").string(), tensors, meta);
  auto config = m->config().to_hf_json();
  config["torch_dtype"] = "float32";
  config["quantization_config"] = {
      {"quant_method", q.method.quant_method}, {"bits", q.method.bits}, {"group_size", q.group_size}};
  env::write_file_atomic((fs::path(dir) / "config.json").string(), config.dump(2) + "\n");
}

model::CausalLM load_quantized_model(const std::string& dir, torch::Device device, QuantizedLayers layers) {
  const auto file_path = (fs::path(dir) / "model.safetensors").string();
  if (!fs::exists(file_path)) return load_model(dir, device);
  model::SafetensorsFile file(file_path);
  const auto& meta = file.metadata();
  if (!meta.count("quant_method")) return load_model(dir, device);
  int bits = 0;
  int64_t g = 0;
  try {
    bits = std::stoi(meta.at("bits"));
    g = std::stoll(meta.at("group_size"));
  } catch (const std::exception&) {
    throw runtime_error(file_path, "quantization metadata needs integer 'bits' and 'group_size'");
  }
  if ((bits != 4 && bits != 8) || (g <= 0 && g != kPerChannel))
    throw runtime_error(file_path, "unsupported quantization: bits " + std::to_string(bits) + ", group size " +
                                       std::to_string(g));
  model::ModelConfig c = model::ModelConfig::from_hf_json_file((fs::path(dir) / "config.json").string());
  c.use_mtp = false;
  model::CausalLM m = [&] {
    model::SkipWeightInit skip;  // every weight is read below; packed layers' float weights are never touched
    return model::CausalLM(c);
  }();
  torch::NoGradGuard no_grad;
  std::vector<std::string> problems;
  std::set<std::string> used;
  std::map<std::string, QuantizedWeight> packed;  // layers that keep their codes (quantized_linear.h)
  for (auto& [name, t] : model::hf_state_dict(m)) {
    if (file.contains(name)) {
      if (file.shape(name) != t.sizes().vec()) {
        problems.push_back(name + ": expected " + shape_str(t.sizes()) + ", found " + shape_str(file.shape(name)));
        continue;
      }
      t.copy_(file.tensor(name));
      file.release(name);
      used.insert(name);
      continue;
    }
    const std::string base = ends_with(name, ".weight") ? name.substr(0, name.size() - 7) : "";
    if (base.empty() || !file.contains(base + ".qweight")) {
      problems.push_back("missing " + name + " " + shape_str(t.sizes()));
      continue;
    }
    const int64_t out = t.size(0), in = t.size(1), lg = layer_group_size(in, g);
    const std::vector<int64_t> qshape = {out, bits == 4 ? in / 2 : in}, gshape = {out, in / lg};
    if (in % lg != 0 || !file.contains(base + ".scales") || !file.contains(base + ".zeros") ||
        file.shape(base + ".qweight") != qshape || file.shape(base + ".scales") != gshape ||
        file.shape(base + ".zeros") != gshape) {
      problems.push_back(base + ": quantized tensors do not match " + shape_str(t.sizes()) + " (expected qweight " +
                         shape_str(qshape) + ", scales/zeros " + shape_str(gshape) + ")");
      continue;
    }
    QuantizedWeight q{file.tensor(base + ".qweight"), file.tensor(base + ".scales"), file.tensor(base + ".zeros"),
                      bits, lg, in};
    if (layers != QuantizedLayers::Dequantized && device.is_cpu() && has_packed_kernel(q) && !ends_with(base, "kv_b_proj"))
      packed.emplace(base, q);
    else
      t.copy_(dequantize(q));
    for (const char* part : {".qweight", ".scales", ".zeros"}) {
      file.release(base + part);  // packed layers read their codes again below, one layer at a time
      used.insert(base + part);
    }
  }
  const int64_t L = c.num_hidden_layers;
  for (const auto& name : file.names()) {
    if (used.count(name)) continue;
    const int64_t layer = name.rfind("model.layers.", 0) == 0 ? std::stoll(name.substr(13, name.find('.', 13) - 13)) : -1;
    if (layer >= L && layer < L + c.num_nextn_predict_layers) continue;  // MTP layers: not used for inference
    problems.push_back("unexpected " + name + " " + shape_str(file.shape(name)));
  }
  if (!problems.empty()) {
    std::string msg = std::to_string(problems.size()) + " tensor problem(s): " + problems.front();
    for (size_t i = 1; i < std::min<size_t>(problems.size(), 8); ++i) msg += "; " + problems[i];
    throw runtime_error(file_path, msg, "the file does not match config.json");
  }
  if (!packed.empty()) {
    for (const auto& item : m->named_modules("", /*include_self=*/false)) {
      auto it = packed.find(item.key());
      auto* lin = item.value()->as<model::Linear>();
      if (it == packed.end() || !lin) continue;
      lin->weight_only = packed_kernel(it->second, layers == QuantizedLayers::Kernels ? kMaxKernelRows : 0);
      file.release(item.key() + ".qweight");
      lin->weight.set_data(torch::empty({0}, lin->weight.options()));  // the packed codes replace it
    }
  }
  m->to(device);
  m->eval();
#ifdef __GLIBC__
  // Loading interleaves kept codes with freed temporaries on the heap; hand the freed pages back to the system.
  ::malloc_trim(0);
#endif
  return m;
}

// ---- sizes ----------------------------------------------------------------------------------------------------

double bits_per_weight(int bits, int64_t g, torch::Dtype scale_dtype) {
  return bits + 2.0 * static_cast<double>(c10::elementSize(scale_dtype) * 8) / static_cast<double>(g);
}

SizeReport size_report(model::CausalLM& m, const QuantizedModel& q) {
  SizeReport r;
  for (const auto& [name, t] : model::hf_state_dict(m)) r.params += t.numel();
  int64_t qbytes = 0;
  for (const auto& [name, w] : q.layers) {
    r.quantized_params += w.qweight.size(0) * w.in_features;
    for (const auto* t : {&w.qweight, &w.scales, &w.zeros}) qbytes += t->numel() * static_cast<int64_t>(t->element_size());
  }
  r.bytes_before = r.params * 4;
  r.bytes_before_16bit = r.params * 2;
  r.bytes_after = (r.params - r.quantized_params) * 4 + qbytes;
  r.bytes_after_16bit = (r.params - r.quantized_params) * 2 + qbytes;
  r.bits_per_weight = r.quantized_params ? 8.0 * static_cast<double>(qbytes) / static_cast<double>(r.quantized_params) : 0.0;
  const double p7b = 6.91e9, embed_head = 2.0 * 102400 * 4096;
  r.projected_7b_bytes_all = p7b * r.bits_per_weight / 8;
  r.projected_7b_bytes = (p7b - embed_head) * r.bits_per_weight / 8 + embed_head * 2;
  return r;
}

}  // namespace dsopen::inference
