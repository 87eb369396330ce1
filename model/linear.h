// Linear: the projection every layer of the model uses. It is torch::nn::Linear (same parameters, same names:
// weight, bias, same initialisation) that can carry a LoRA adapter (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
// Models"):
//   y = x W^T + b + scale * B(A(dropout(x))),   A: [r, in], B: [out, r], scale = alpha / r (rsLoRA: alpha / sqrt(r))
// A and B are registered as the submodules lora_A and lora_B, so their parameters are named
// <module>.lora_A.weight / <module>.lora_B.weight, the names PEFT files use. Without an adapter the layer is
// exactly nn::Linear. The frozen weight may be stored in another dtype than the activations (a bf16 base under
// fp32 training): outside autocast it is cast to the input's dtype on the fly.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <vector>

namespace dsopen::model {

// While one is alive on this thread, new modules leave their weights uninitialised (Linear, the embedding, and
// CausalLM skips init_weights): for loaders, which overwrite every weight from a file. Initialising a 7B model would take a minute
// and touch all of its float32 pages, including those of layers a quantized model then replaces by their codes.
// A generator seed for the module or parameter `name`: FNV-1a over the name, started from `base` (one draw of the
// global generator). Initializing by name gives a module the same values whichever other modules a process holds
// (expert parallelism), and leaves the global stream as if they were absent.
uint64_t named_seed(uint64_t base, const std::string& name);
// One draw of the global CPU generator, the `base` of named_seed.
uint64_t draw_seed_base();

class SkipWeightInit {
public:
  SkipWeightInit();
  ~SkipWeightInit();
  SkipWeightInit(const SkipWeightInit&) = delete;
  SkipWeightInit& operator=(const SkipWeightInit&) = delete;
  static bool active();

private:
  bool previous_;
};

class LinearImpl : public torch::nn::Cloneable<LinearImpl> {
public:
  LinearImpl(int64_t in, int64_t out) : LinearImpl(torch::nn::LinearOptions(in, out)) {}
  explicit LinearImpl(const torch::nn::LinearOptions& options);
  void reset() override;
  // As torch::nn::Linear: kaiming-uniform weight (a = sqrt(5)), bias uniform in +-1/sqrt(in).
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const torch::Tensor& x);  // x: [..., in] -> [..., out]

  torch::nn::LinearOptions options;
  torch::Tensor weight;  // [out, in]
  torch::Tensor bias;    // [out], or undefined

  // Attaches an adapter of rank r. A is initialised as nn.Linear is (kaiming-uniform, a = sqrt(5)) and B to zero,
  // as PEFT does, so the output is unchanged until B trains. A and B are float32 on the weight's device.
  void add_lora(int64_t r, double alpha, bool use_rslora, double dropout);
  bool has_lora() const { return static_cast<bool>(lora_A); }
  // The adapter's whole effect as one matrix: weight + scale * B A (promoted to float32 when the adapter is);
  // the weight itself without an adapter. Used where the weight is applied by other means than forward.
  torch::Tensor merged_weight() const;
  // Folds scale * B A into the weight (kept in its dtype) and removes the adapter.
  void merge_lora();
  void remove_lora();

  // Weight-only quantized inference: when set, it computes x W^T (without bias) in place of `weight`, which may
  // then be empty; merging an adapter into such a layer is an error.
  std::function<torch::Tensor(const torch::Tensor&)> weight_only;
  // Optionally, the same product on raw buffers for the CPU decode step (model/decode_step.h): x float32
  // [rows, in] -> y float32 [rows, out]; returns false where it does not take `rows` (weight_only runs then).
  std::function<bool(const float* x, int64_t rows, float* y)> weight_only_rows;

  torch::nn::Linear lora_A{nullptr}, lora_B{nullptr};
  int64_t lora_rank = 0;
  double lora_alpha = 0, lora_scale = 0, lora_dropout = 0;
  bool lora_rslora = false;

  // Several adapters served over one base (model/lora.h add_served_adapter): entry k - 1 holds adapter k's
  // A [r, in], B [out, r] and scale (A undefined where adapter k leaves this layer alone). The rows of a forward
  // add the delta of the adapter ServedAdapterRows names for them, computed as an attached adapter computes it.
  struct ServedAdapter {
    torch::Tensor A, B;
    double scale = 0;
  };
  std::vector<ServedAdapter> served_adapters;
  // Whether any of `rows` (adapter ids, 0: the base) names an adapter of this layer.
  bool serves(const std::vector<int64_t>& rows) const;
  // merged_weight() with served adapter `id` folded in (id 0: merged_weight()).
  torch::Tensor served_weight(int64_t id) const;

private:
  torch::Tensor add_served(const torch::Tensor& x, torch::Tensor y, const std::vector<int64_t>& rows) const;
};
TORCH_MODULE(Linear);

// Linear without bias (the common case).
Linear linear(int64_t in, int64_t out, bool bias = false);

}  // namespace dsopen::model
