#include "inference/loader.h"

#include <cstdio>

#include "utils/env.h"

#include <map>

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "inference/quantized_format.h"
#include "inference/quantized_linear.h"
#include "model/gemv.h"
#include "model/model_dir.h"
#include "model/tile_rows.h"
#include "model/weights.h"
#include "utils/errors.h"

namespace dsopen::inference {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The weight loader's hook for quantized layers: <layer>.weight comes from the layer's quantized tensors, either
// dequantized into the model now or (layers a kernel takes) kept in `packed` for the Linear to hold.
model::AlternateTensorHook quantized_hook(const QuantizationMeta& meta, torch::Device device, QuantizedLayers layers,
                                          std::map<std::string, QuantizedWeight>& packed) {
  return [&meta, device, layers, &packed](const std::string& name, torch::Tensor& t, const model::WeightFiles& files) {
    model::AlternateTensor alt;
    if (!ends_with(name, ".weight") || t.dim() != 2) return alt;
    const std::string base = name.substr(0, name.size() - 7);
    auto q = read_quantized_weight(files, base, t.size(0), t.size(1), meta, alt.problem);
    // The layer's tensors are accounted for even when they are faulty: the one problem is reported, not each tensor
    // again as unexpected. (g_idx is optional.)
    for (const auto& part : quantized_tensor_names(base, meta))
      if (files.contains(part)) alt.consumed.push_back(part);
    if (!q) return alt;
    alt.found = true;
    if (layers != QuantizedLayers::Dequantized && device.is_cpu() && has_packed_kernel(*q) && !ends_with(base, "kv_b_proj"))
      packed.emplace(base, *q);
    else
      t.copy_(dequantize(*q));
    for (const auto& part : alt.consumed) files.release(part);  // packed layers read their codes again below
    return alt;
  };
}

// Hands the kept codes to their Linear layers, whose float weights they replace.
void attach_packed(model::CausalLM& m, const std::map<std::string, QuantizedWeight>& packed, QuantizedLayers layers,
                   const model::WeightFiles& files) {
  for (const auto& item : m->named_modules("", /*include_self=*/false)) {
    auto it = packed.find(item.key());
    auto* lin = item.value()->as<model::Linear>();
    if (it == packed.end() || !lin) continue;
    attach_packed_kernel(*lin, it->second, layers == QuantizedLayers::Kernels ? kMaxKernelRows : 0);
    files.release(item.key() + ".qweight");  // the kernel holds its own copy of the codes
    lin->weight.set_data(torch::empty({0}, lin->weight.options()));
  }
}

}  // namespace

model::CausalLM load_model(const std::string& dir, torch::Device device, bool keep_mtp, QuantizedLayers layers) {
  const model::ModelDir md(dir);
  model::ModelConfig c = md.config();
  const model::WeightFiles weights = md.weights();
  c.use_mtp = keep_mtp && c.num_nextn_predict_layers > 0 &&
              weights.contains("model.layers." + std::to_string(c.num_hidden_layers) + ".eh_proj.weight");
  const auto meta = read_quantization_meta(weights, md.has("config.json") ? md.file("config.json") : "");
  // A float model is built in fp32 on the host: refuse what cannot fit before allocating it. (Quantized layers'
  // float buffers are never touched, so their size says nothing.)
  const double need = 4.0 * static_cast<double>(model::count_parameters(c).total);
  const env::MemoryBudget host = env::host_memory_budget();
  if (!meta && host.bytes > 0 && need > static_cast<double>(host.bytes)) {
    char msg[160];
    std::snprintf(msg, sizeof msg, "the model needs %.1f GiB in fp32 but %.1f GiB of memory is available (%s)",
                  need / (1 << 30), static_cast<double>(host.bytes) / (1 << 30), host.source.c_str());
    throw runtime_error(dir, msg, "quantize it with dsopen-quantize on a larger machine, or use a smaller model");
  }
  model::CausalLM m = [&] {
    model::SkipWeightInit skip;  // every weight is read below; packed layers' float weights are never touched
    return model::CausalLM(c);
  }();
  torch::NoGradGuard no_grad;
  std::map<std::string, QuantizedWeight> packed;
  model::LoadOptions options;
  if (meta) options.alternate = quantized_hook(*meta, device, layers, packed);
  model::load_hf_state_dict(m, weights, options);
  if (!packed.empty()) attach_packed(m, packed, layers, weights);
  m->to(device);
  m->eval();
  // The decode step's kernels: the instruction set, and whether a prompt's products take the tiles or a GEMM (this
  // machine's measured crossover). Resolved now, so that the one-time measurement, or a bad DSOPEN_GEMV_ISA or
  // DSOPEN_TILE_ROWS, happens at load and not inside a first request.
  if (device.is_cpu()) {
    model::gemv_isa();
    model::tile_rows();
  }
#ifdef __GLIBC__
  // Loading interleaves kept codes with freed temporaries on the heap; hand the freed pages back to the system.
  if (meta) ::malloc_trim(0);
#endif
  return m;
}

}  // namespace dsopen::inference
