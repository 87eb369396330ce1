#include "model/linear.h"

#include "model/gemv.h"
#include "model/lora.h"

#include <cmath>

#include "utils/compat.h"
#include "utils/errors.h"

namespace dsopen::model {

namespace {
// Outside autocast a tensor stored in another dtype is applied in the input's dtype; autocast casts by itself.
torch::Tensor as_input_dtype(const torch::Tensor& t, const torch::Tensor& x) {
  if (!t.defined() || t.scalar_type() == x.scalar_type() || compat::autocast_enabled(x.device().type())) return t;
  return t.to(x.scalar_type());
}
}  // namespace

namespace {
thread_local bool tl_skip_weight_init = false;
}  // namespace

uint64_t named_seed(uint64_t base, const std::string& name) {
  uint64_t h = 1469598103934665603ULL ^ base;
  for (unsigned char ch : name) h = (h ^ ch) * 1099511628211ULL;
  return h;
}

uint64_t draw_seed_base() {
  return static_cast<uint64_t>(torch::randint(1LL << 62, {1}, torch::kLong).item<int64_t>());
}

SkipWeightInit::SkipWeightInit() : previous_(tl_skip_weight_init) { tl_skip_weight_init = true; }
SkipWeightInit::~SkipWeightInit() { tl_skip_weight_init = previous_; }
bool SkipWeightInit::active() { return tl_skip_weight_init; }

LinearImpl::LinearImpl(const torch::nn::LinearOptions& options_) : options(options_) { reset(); }

void LinearImpl::reset() {
  // torch::empty reserves the pages without touching them: a weight that is never written costs no memory.
  weight = register_parameter("weight", torch::empty({options.out_features(), options.in_features()}));
  bias = options.bias() ? register_parameter("bias", torch::empty({options.out_features()}))
                        : register_parameter("bias", {}, /*requires_grad=*/false);
  if (!SkipWeightInit::active()) reset_parameters();
}

void LinearImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
  if (bias.defined()) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(options.in_features()));
    bias.uniform_(-bound, bound);
  }
}

void LinearImpl::pretty_print(std::ostream& stream) const {
  stream << "dsopen::model::Linear(in_features=" << options.in_features() << ", out_features=" << options.out_features()
         << ", bias=" << options.bias() << (lora_A ? ", lora_rank=" + std::to_string(lora_rank) : "") << ")";
}

torch::Tensor LinearImpl::forward(const torch::Tensor& x) {
  torch::Tensor y;
  if (weight_only) y = bias.defined() ? weight_only(x) + as_input_dtype(bias, x) : weight_only(x);
  // Decode steps: a bandwidth-bound GEMV. Never in training: a checkpointed layer runs its forward without grad,
  // and the GEMV (in the weight's dtype, not autocast's) would compute other values than its recomputation.
  else if (!is_training() && gemv_applies(x, weight)) y = gemv(x, weight, bias);
  else y = torch::nn::functional::linear(x, as_input_dtype(weight, x), as_input_dtype(bias, x));
  if (!served_adapters.empty())
    if (const auto* rows = ServedAdapterRows::current(); rows && serves(*rows)) y = add_served(x, y, *rows);
  if (!lora_A) return y;
  auto h = (lora_dropout > 0 && is_training()) ? torch::dropout(x, lora_dropout, /*train=*/true) : x;
  auto delta = torch::nn::functional::linear(
      torch::nn::functional::linear(h, as_input_dtype(lora_A->weight, h)), as_input_dtype(lora_B->weight, h));  // [..., out]
  return y + delta * lora_scale;
}

void LinearImpl::add_lora(int64_t r, double alpha, bool use_rslora, double dropout) {
  if (r <= 0) throw usage_error("lora.r", "must be >= 1, got " + std::to_string(r));
  if (lora_A) throw usage_error("lora", "this projection already has an adapter");
  const int64_t in = weight.size(1), out = weight.size(0);
  lora_A = register_module("lora_A", torch::nn::Linear(torch::nn::LinearOptions(in, r).bias(false)));
  lora_B = register_module("lora_B", torch::nn::Linear(torch::nn::LinearOptions(r, out).bias(false)));
  lora_A->to(weight.device(), torch::kFloat32);
  lora_B->to(weight.device(), torch::kFloat32);
  {
    torch::NoGradGuard no_grad;
    lora_B->weight.zero_();
  }
  lora_rank = r;
  lora_alpha = alpha;
  lora_rslora = use_rslora;
  lora_scale = use_rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
  lora_dropout = dropout;
}

bool LinearImpl::serves(const std::vector<int64_t>& rows) const {
  for (int64_t id : rows)
    if (id > 0 && id <= static_cast<int64_t>(served_adapters.size()) && served_adapters[id - 1].A.defined()) return true;
  return false;
}

torch::Tensor LinearImpl::served_weight(int64_t id) const {
  torch::Tensor w = merged_weight();
  if (id <= 0 || id > static_cast<int64_t>(served_adapters.size()) || !served_adapters[id - 1].A.defined()) return w;
  const auto& a = served_adapters[id - 1];
  return w + torch::mm(a.B, a.A) * a.scale;  // [out, in], as merged_weight folds an attached adapter
}

// y [B, ..., out] += each row's adapter delta: rows of one adapter go through its A and B together.
// The batch rows' ids apply to x's leading dimension: [B, T, in] directly, and [B * T, in] (an MLP's flattened
// tokens, row-major) with each id repeated T times.
torch::Tensor LinearImpl::add_served(const torch::Tensor& x, torch::Tensor y, const std::vector<int64_t>& batch_rows) const {
  const int64_t n = x.dim() >= 2 ? x.size(0) : 0, B = static_cast<int64_t>(batch_rows.size());
  TORCH_CHECK(n > 0 && n % B == 0, "served adapters: ", B, " row adapter ids for an input of ", n, " rows");
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < n; ++i) rows.push_back(batch_rows[static_cast<size_t>(i / (n / B))]);
  const auto groups = ServedAdapterRows::groups(rows);
  for (const auto& [id, pick] : groups) {
    if (id <= 0 || id > static_cast<int64_t>(served_adapters.size()) || !served_adapters[id - 1].A.defined()) continue;
    const auto& a = served_adapters[id - 1];
    auto delta = [&](const torch::Tensor& h) {
      return torch::nn::functional::linear(torch::nn::functional::linear(h, as_input_dtype(a.A, h)), as_input_dtype(a.B, h)) *
             a.scale;
    };
    if (groups.size() == 1) return y + delta(x);  // every row takes this adapter
    const auto index = torch::tensor(pick, torch::kLong).to(x.device());
    const auto part = y.index_select(0, index) + delta(x.index_select(0, index));
    y = y.index_copy(0, index, part);
  }
  return y;
}

torch::Tensor LinearImpl::merged_weight() const {
  TORCH_CHECK(!weight_only, "merged_weight: this layer holds a packed quantized weight");
  if (!lora_A) return weight;
  return weight + torch::mm(lora_B->weight, lora_A->weight) * lora_scale;  // [out, in]
}

void LinearImpl::merge_lora() {
  if (!lora_A) return;
  if (weight_only) throw usage_error("--adapter", "cannot merge an adapter into a packed quantized weight");
  torch::NoGradGuard no_grad;
  // In float32 (or wider), then one rounding to the stored dtype.
  const auto wide = torch::promote_types(weight.scalar_type(), torch::kFloat32);
  weight.copy_(weight.to(wide) + torch::mm(lora_B->weight, lora_A->weight).to(wide) * lora_scale);
  remove_lora();
}

void LinearImpl::remove_lora() {
  if (!lora_A) return;
  unregister_module("lora_A");
  unregister_module("lora_B");
  lora_A = nullptr;
  lora_B = nullptr;
  lora_rank = 0;
  lora_alpha = lora_scale = lora_dropout = 0;
  lora_rslora = false;
}

Linear linear(int64_t in, int64_t out, bool bias) { return Linear(torch::nn::LinearOptions(in, out).bias(bias)); }

}  // namespace dsopen::model
