#include "train/optimizer.h"

#include <cmath>

#include "utils/errors.h"

namespace dsopen::train {

FlatAdamW::FlatAdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, const AdamWOptions& o)
    : opts_(o) {
  std::vector<std::pair<std::string, torch::Tensor>> members[2];  // [no decay, decay]
  for (const auto& [name, p] : named_params) {
    if (!p.requires_grad()) continue;
    const bool embedding = name.find("embed_tokens") != std::string::npos;
    const bool decay = p.dim() >= 2 && (!embedding || o.decay_embeddings);
    members[decay].push_back({name, p});
  }
  for (int d = 1; d >= 0; --d) {
    if (members[d].empty()) continue;
    int64_t total = 0;
    for (const auto& np : members[d]) total += np.second.numel();
    const auto opts = members[d].front().second.options().dtype(torch::kFloat32);
    Group g{d ? "decay" : "no_decay", d == 1, torch::empty({total}, opts), torch::zeros({total}, opts),
            torch::zeros({total}, opts), torch::zeros({total}, opts), {}};
    int64_t off = 0;
    torch::NoGradGuard no_grad;
    for (auto& [name, p] : members[d]) {
      const int64_t n = p.numel();
      auto slot = g.params.narrow(0, off, n);
      slot.copy_(p.detach().reshape({-1}));
      p.set_data(slot.view(p.sizes()));                               // the parameter now lives in the buffer
      p.mutable_grad() = g.grads.narrow(0, off, n).view(p.sizes());  // backward accumulates in place here
      g.names.push_back(name);
      off += n;
    }
    groups_.push_back(std::move(g));
  }
}

void FlatAdamW::zero_grad() {
  for (auto& g : groups_) g.grads.zero_();
}

double FlatAdamW::grad_norm() const {
  // One fused norm kernel per group (pairwise-summed in fp32), combined in double.
  double sq = 0;
  for (const auto& g : groups_) {
    const double n = g.grads.norm().item<double>();
    sq += n * n;
  }
  return std::sqrt(sq);
}

void FlatAdamW::scale_grads(double factor) {
  for (auto& g : groups_) g.grads.mul_(factor);
}

void FlatAdamW::step(double lr) {
  torch::NoGradGuard no_grad;
  ++step_;
  const double bc1 = 1.0 - std::pow(opts_.beta1, static_cast<double>(step_));
  const double bc2 = 1.0 - std::pow(opts_.beta2, static_cast<double>(step_));
  for (auto& g : groups_) {
    if (g.decay && opts_.weight_decay > 0) g.params.mul_(1.0 - lr * opts_.weight_decay);  // decoupled decay
    g.m.lerp_(g.grads, 1.0 - opts_.beta1);                                            // m = b1 m + (1-b1) g
    g.v.mul_(opts_.beta2).addcmul_(g.grads, g.grads, 1.0 - opts_.beta2);              // v = b2 v + (1-b2) g^2
    auto denom = (g.v / bc2).sqrt_().add_(opts_.eps);
    g.params.addcdiv_(g.m, denom, -lr / bc1);
  }
}

int64_t FlatAdamW::num_params() const {
  int64_t n = 0;
  for (const auto& g : groups_) n += g.params.numel();
  return n;
}
int64_t FlatAdamW::state_bytes() const { return 2 * num_params() * 4; }
int64_t FlatAdamW::grad_bytes() const { return num_params() * 4; }

std::map<std::string, torch::Tensor> FlatAdamW::state_dict() const {
  std::map<std::string, torch::Tensor> s;
  for (const auto& g : groups_) {
    s[g.name + ".exp_avg"] = g.m;
    s[g.name + ".exp_avg_sq"] = g.v;
  }
  s["step"] = torch::tensor({step_}, torch::kInt64);
  return s;
}

void FlatAdamW::load_state_dict(const std::map<std::string, torch::Tensor>& s, const std::string& source) {
  auto get = [&](const std::string& key, int64_t numel) {
    auto it = s.find(key);
    if (it == s.end()) throw runtime_error(source, "optimizer state lacks '" + key + "'", "is this checkpoint from another model?");
    if (it->second.numel() != numel)
      throw runtime_error(source, "optimizer state '" + key + "' has " + std::to_string(it->second.numel()) +
                                      " values, the model needs " + std::to_string(numel),
                          "the checkpoint was written for another model or parameter set");
    return it->second;
  };
  torch::NoGradGuard no_grad;
  for (auto& g : groups_) {
    g.m.copy_(get(g.name + ".exp_avg", g.m.numel()));
    g.v.copy_(get(g.name + ".exp_avg_sq", g.v.numel()));
  }
  step_ = get("step", 1).item<int64_t>();
}

double lr_at(int64_t step, const ScheduleOptions& s) {
  if (step < s.warmup_steps) return s.lr * static_cast<double>(step + 1) / static_cast<double>(s.warmup_steps);
  const double span = std::max<int64_t>(1, s.max_steps - 1 - s.warmup_steps);
  const double t = std::min(1.0, static_cast<double>(step - s.warmup_steps) / span);  // 0 -> 1 after warmup
  if (s.kind == "constant") return s.lr;
  if (s.kind == "linear") return s.lr + (s.min_lr - s.lr) * t;
  if (s.kind == "cosine") return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1.0 + std::cos(M_PI * t));
  // wsd: hold lr, then decay linearly over the last decay_fraction of all steps.
  const double decay_start = (1.0 - s.decay_fraction) * static_cast<double>(s.max_steps - 1);
  if (step <= decay_start) return s.lr;
  const double u = (step - decay_start) / std::max(1e-9, static_cast<double>(s.max_steps - 1) - decay_start);
  return s.lr + (s.min_lr - s.lr) * std::min(1.0, u);
}

}  // namespace dsopen::train
