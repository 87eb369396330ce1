// Weight-only quantization (see quantize.h for the layout and the algorithms' sources).
#include "inference/quantize.h"

#include <ATen/record_function.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <set>
#include <unordered_map>

#include "data/dataset.h"
#include "model/safetensors.h"
#include "model/weights.h"
#include "utils/env.h"
#include "utils/compat.h"
#include "utils/errors.h"
#include "utils/progress.h"
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

// ---- groups --------------------------------------------------------------------------------------------------

std::pair<torch::Tensor, torch::Tensor> group_params(const torch::Tensor& w, int bits, torch::Dtype dtype, bool sym) {
  const double maxq = (1 << bits) - 1;
  auto wd = w.to(torch::kFloat64);
  auto mn = wd.amin(1).clamp_max(0.0);  // [out]; the range always holds 0 so that zero is a code
  auto mx = wd.amax(1).clamp_min(0.0);
  auto flat = (mn == 0) & (mx == 0);
  mn = torch::where(flat, torch::full_like(mn, -1.0), mn);
  mx = torch::where(flat, torch::full_like(mx, 1.0), mx);
  if (sym) {  // GPTQ's symmetric grid: [-m, m] with m = max|w|, zero in the middle code
    auto scale = round_up_to(2 * torch::maximum(-mn, mx) / maxq, dtype);
    return {scale, torch::full_like(scale, std::floor((maxq + 1) / 2))};
  }
  auto scale = round_up_to((mx - mn) / maxq, dtype);
  auto zero = torch::round(-mn / scale).clamp(0, maxq);
  // The GPTQ (v1) layout stores zero - 1 in `bits` bits, so zero 0 (no weight below -scale / 2) cannot be stored:
  // such groups take zero 1 and a step that still reaches both ends, max / (maxq - 1) or -min.
  auto low = zero < 1;
  auto lifted = round_up_to(torch::maximum(mx / (maxq - 1), -mn), dtype);
  return {torch::where(low, lifted, scale), torch::where(low, torch::ones_like(zero), zero)};
}

QuantizedWeight quantize_rtn(const torch::Tensor& W, int bits, int64_t g, const std::string& layer,
                             torch::Dtype scale_dtype, bool sym) {
  TORCH_CHECK(W.dim() == 2, "quantize_rtn: ", layer, " must be 2-D, got ", W.sizes());
  const int64_t out = W.size(0), in = W.size(1);
  check_group_size(in, g, bits, layer);
  g = layer_group_size(in, g);
  const int64_t G = in / g;
  auto wg = W.detach().to(torch::kCPU, torch::kFloat64).reshape({out * G, g});  // rows = (o, group)
  auto [scale, zero] = group_params(wg, bits, scale_dtype, sym);
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
        auto [s, z] = group_params(cur, bits, o.scale_dtype, o.sym);
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
    // The *_proj projections and Mixtral's experts (w1/w2/w3); the head when asked. Gates (the router, Qwen2-MoE's
    // [1, hidden] shared_expert_gate) and MLA's kv_a_proj_with_mqa stay in full precision.
    const bool projection = ends_with(name, "_proj") || ends_with(name, ".w1") || ends_with(name, ".w2") ||
                            ends_with(name, ".w3");
    if (name == "lm_head" ? quantize_head : projection) out.emplace_back(name, lin);
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

  Progress progress("quantize", static_cast<int64_t>(targets.size()), "layers");
  if (result.method.quant_method == "rtn") {
    for (const auto& [name, lin] : targets) {
      result.layers[name] = quantize_rtn(lin->weight, bits, o.group_size, name, o.gptq.scale_dtype, o.gptq.sym);
      progress.update(static_cast<int64_t>(result.layers.size()));
    }
    progress.finish();
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
        q = quantize_rtn(lin->weight, bits, o.group_size, name, o.gptq.scale_dtype, o.gptq.sym);
      } else {
        q = gptq_quantize_layer(lin->weight, acc[k].H, bits, o.group_size, o.gptq, name);
      }
      lin->weight.copy_(dequantize(q).to(lin->weight.options()));
      result.layers[name] = std::move(q);
      progress.update(static_cast<int64_t>(result.layers.size()));
    }
    spdlog::info("gptq: {} ({} layers) done", stage, layers.size());
  }
  progress.finish();
  return result;
}

std::vector<torch::Tensor> calibration_batches(const std::vector<std::string>& shards, int64_t samples, int64_t seq_len,
                                               int64_t vocab, const std::string& tokenizer_hash) {
  data::TokenDatasetOptions o;
  o.tokenizer_hash = tokenizer_hash;
  o.tokenizer_of = "model's tokenizer";
  o.shards = shards;
  o.seq_len = seq_len;
  o.shards_name = "--calib-data";
  o.seq_len_name = "--calib-seq-len";
  o.model_vocab_size = vocab;
  data::TokenDataset ds(o, data::Split::All);
  const int64_t n = std::min(samples, ds.num_samples());
  if (n <= 0) throw runtime_error("--calib-data", "no sequence of --calib-seq-len tokens in the shards");
  std::vector<int64_t> ids(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ids[static_cast<size_t>(i)] = i * ds.num_samples() / n;
  std::vector<torch::Tensor> batches;
  for (size_t i = 0; i < ids.size(); i += 8) {
    std::vector<int64_t> chunk(ids.begin() + static_cast<std::ptrdiff_t>(i),
                               ids.begin() + static_cast<std::ptrdiff_t>(std::min(ids.size(), i + 8)));
    batches.push_back(ds.make_batch(chunk).input_ids);
  }
  return batches;
}

void save_quantized_model(model::CausalLM& m, const QuantizedModel& q, const std::string& out,
                          const std::map<std::string, std::string>& files, const QuantizeOptions& o) {
  // Every layer in the GPTQ layout first: a layer that does not pack is refused before anything is written.
  std::map<std::string, torch::Tensor> quantized;
  for (const auto& [name, w] : q.layers) {
    const auto t = to_gptq_layout(w, name);
    quantized[name + ".qweight"] = t.qweight;
    quantized[name + ".qzeros"] = t.qzeros;
    quantized[name + ".scales"] = t.scales;
    quantized[name + ".g_idx"] = t.g_idx;
  }
  const auto qconfig = gptq_quantization_config(q.method.bits, q.group_size, o.gptq.sym,
                                                q.method.quant_method == "gptq" && o.gptq.act_order, q.layers.count("lm_head") > 0,
                                                q.method.quant_method, o.gptq.percdamp);
  // Staged like an HF export: a failed save leaves an earlier directory at `out` as it was.
  model::write_staged(out, [&](const std::string& dir) -> std::vector<std::string> {
    auto tensors = model::hf_state_dict(m);
    for (const auto& [name, w] : q.layers) tensors.erase(name + ".weight");
    for (const auto& [name, t] : quantized) tensors[name] = t;
    model::save_safetensors((fs::path(dir) / "model.safetensors").string(), tensors, {{"format", "pt"}});
    auto config = m->config().to_hf_json();
    config["torch_dtype"] = "float16";  // what GPTQ kernels compute in; dsopen computes in float32 or bf16
    config["quantization_config"] = qconfig;
    env::write_file_atomic((fs::path(dir) / "config.json").string(), config.dump(2) + "\n");
    env::write_file_atomic((fs::path(dir) / "quantize_config.json").string(), qconfig.dump(2) + "\n");  // AutoGPTQ's
    std::vector<std::string> written{"model.safetensors", "config.json", "quantize_config.json"};
    for (const auto& [name, contents] : files) {
      env::write_file_atomic((fs::path(dir) / name).string(), contents);
      written.push_back(name);
    }
    return written;
  });
}

// ---- sizes ----------------------------------------------------------------------------------------------------

double bits_per_weight(int bits, int64_t g, torch::Dtype scale_dtype) {
  return bits + (static_cast<double>(c10::elementSize(scale_dtype) * 8) + bits) / static_cast<double>(g);
}

SizeReport size_report(model::CausalLM& m, const QuantizedModel& q) {
  SizeReport r;
  for (const auto& [name, t] : model::hf_state_dict(m)) r.params += t.numel();
  int64_t qbytes = 0;
  for (const auto& [name, w] : q.layers) {
    r.quantized_params += w.qweight.size(0) * w.in_features;
    // The stored tensors (GPTQ layout): codes and zeros at `bits`, scales, one int32 group index per input.
    const int64_t out = w.qweight.size(0), G = w.scales.size(1);
    qbytes += (out * w.in_features + G * out) * w.bits / 8 + w.scales.numel() * static_cast<int64_t>(w.scales.element_size()) +
              4 * w.in_features;
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
