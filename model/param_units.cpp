#include "model/param_units.h"

#include <torch/csrc/autograd/custom_function.h>

#include "model/config.h"
#include "model/linear.h"

namespace dsopen::model {

int64_t unit_count(const ModelConfig& c) { return c.num_hidden_layers + 3 + c.mtp_depth(); }

int64_t unit_of(const std::string& name, const ModelConfig& c) {
  const auto number_after = [&](const std::string& prefix) -> int64_t {
    if (name.rfind(prefix, 0) != 0) return -1;
    const size_t dot = name.find('.', prefix.size());
    try {
      return std::stoll(name.substr(prefix.size(), dot - prefix.size()));
    } catch (const std::exception&) {
      return -1;
    }
  };
  if (name.rfind("model.embed_tokens.", 0) == 0) return 0;
  if (const int64_t l = number_after("model.layers."); l >= 0 && l < c.num_hidden_layers) return 1 + l;
  if (name.rfind("model.norm.", 0) == 0) return c.num_hidden_layers + 1;
  if (name.rfind("lm_head.", 0) == 0) return c.num_hidden_layers + 2;
  if (const int64_t k = number_after("mtp."); k >= 0 && k < c.mtp_depth()) return c.num_hidden_layers + 3 + k;
  return -1;
}

std::set<std::string> projection_weight_names(torch::nn::Module& model) {
  std::set<std::string> out;
  for (const auto& item : model.named_modules("", /*include_self=*/false)) {
    const auto& m = item.value();
    if (item.key() == "lm_head") continue;
    if (dynamic_cast<LinearImpl*>(m.get()) || dynamic_cast<torch::nn::LinearImpl*>(m.get())) out.insert(item.key() + ".weight");
  }
  return out;
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

UnitHooks* hooks_of(AutogradContext* ctx) { return reinterpret_cast<UnitHooks*>(ctx->saved_data["hooks"].toInt()); }

// Identity on the use's inputs; its backward runs when the gradients of all of them are complete.
struct AfterBackward : public torch::autograd::Function<AfterBackward> {
  // A TensorList, not a variable_list: only tensors and TensorLists count as the Function's inputs.
  static variable_list forward(AutogradContext* ctx, at::TensorList xs, int64_t hooks, std::vector<int64_t> units) {
    ctx->saved_data["hooks"] = hooks;
    ctx->saved_data["units"] = units;
    return xs.vec();
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    for (const int64_t u : ctx->saved_data["units"].toIntVector()) hooks_of(ctx)->after_backward(u);
    grads.push_back({});  // hooks
    grads.push_back({});  // units
    return grads;
  }
};

// Identity on one output of the use; its backward runs before any backward node of the use.
struct BeforeBackward : public torch::autograd::Function<BeforeBackward> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor y, int64_t hooks, std::vector<int64_t> units) {
    ctx->saved_data["hooks"] = hooks;
    ctx->saved_data["units"] = units;
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    for (const int64_t u : ctx->saved_data["units"].toIntVector()) hooks_of(ctx)->before_backward(u);
    return {grads[0], {}, {}};
  }
};

}  // namespace

UnitUse::UnitUse(UnitHooks* hooks, std::vector<int64_t> units) : hooks_(hooks), units_(std::move(units)) {
  if (hooks_)
    for (const int64_t u : units_) hooks_->before_forward(u);
}

UnitUse::~UnitUse() {
  if (hooks_)
    for (const int64_t u : units_) hooks_->after_forward(u, backward_hooked_);
}

std::vector<torch::Tensor> UnitUse::inputs(const std::vector<torch::Tensor>& xs) {
  if (!hooks_ || !torch::GradMode::is_enabled() || backward_hooked_) return xs;
  std::vector<size_t> which;
  variable_list tracked;
  for (size_t i = 0; i < xs.size(); ++i)
    if (xs[i].defined() && xs[i].requires_grad()) which.push_back(i), tracked.push_back(xs[i]);
  if (tracked.empty()) return xs;  // nothing to hook: the strategy finishes the units at the end of backward
  auto through = AfterBackward::apply(at::TensorList(tracked), reinterpret_cast<int64_t>(hooks_), units_);
  std::vector<torch::Tensor> out = xs;
  for (size_t k = 0; k < which.size(); ++k) out[which[k]] = through[k];
  backward_hooked_ = true;
  return out;
}

torch::Tensor UnitUse::output(const torch::Tensor& y) {
  if (!hooks_ || !torch::GradMode::is_enabled() || !y.defined() || !y.requires_grad()) return y;
  return BeforeBackward::apply(y, reinterpret_cast<int64_t>(hooks_), units_);
}

}  // namespace dsopen::model
