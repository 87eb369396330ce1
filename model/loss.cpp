#include "model/loss.h"

#include "model/moe.h"

namespace dsopen::model {

LossCounts& LossCounts::operator+=(const LossCounts& o) {
  targets += o.targets;
  units += o.units;
  if (mtp_targets.size() < o.mtp_targets.size()) mtp_targets.resize(o.mtp_targets.size(), 0.0);
  if (mtp_units.size() < o.mtp_units.size()) mtp_units.resize(o.mtp_units.size(), 0.0);
  for (size_t k = 0; k < o.mtp_targets.size(); ++k) mtp_targets[k] += o.mtp_targets[k];
  for (size_t k = 0; k < o.mtp_units.size(); ++k) mtp_units[k] += o.mtp_units[k];
  return *this;
}

std::vector<double> LossCounts::to_vector() const {
  std::vector<double> v{targets, units};
  v.insert(v.end(), mtp_targets.begin(), mtp_targets.end());
  v.insert(v.end(), mtp_units.begin(), mtp_units.end());
  return v;
}

LossCounts LossCounts::from_vector(const std::vector<double>& v) {
  LossCounts c;
  c.targets = v.at(0);
  c.units = v.at(1);
  const size_t depths = (v.size() - 2) / 2;
  c.mtp_targets.assign(v.begin() + 2, v.begin() + 2 + depths);
  c.mtp_units.assign(v.begin() + 2 + depths, v.end());
  return c;
}

torch::Tensor mtp_targets(const torch::Tensor& labels, const torch::Tensor& segment_ids, int64_t k) {
  const int64_t len = labels.size(1) - k;
  auto targets = labels.narrow(1, k, len);
  // A target k positions ahead in another packed document is not this document's future.
  if (segment_ids.defined())
    targets = targets.masked_fill(segment_ids.narrow(1, 0, len) != segment_ids.narrow(1, k, len), -100);
  return targets;
}

LossCounts count_loss_targets(const ModelConfig& c, const torch::Tensor& labels, const torch::Tensor& segment_ids) {
  LossCounts n;
  auto valid = labels.ne(-100);
  n.targets = static_cast<double>(valid.sum().item<int64_t>());
  const bool moe = c.n_routed_experts > 0;
  if (moe) n.units = static_cast<double>(balance_units(valid, c));
  const int64_t T = labels.size(1);
  for (int64_t k = 1; k <= c.mtp_depth() && k < T; ++k) {
    auto valid_k = mtp_targets(labels, segment_ids, k).ne(-100);
    n.mtp_targets.push_back(static_cast<double>(valid_k.sum().item<int64_t>()));
    n.mtp_units.push_back(moe ? static_cast<double>(balance_units(valid_k, c)) : 0.0);
  }
  return n;
}

Loss compose_loss(const LossSums& s, const LossCounts& n, const ModelConfig& c) {
  // An empty denominator means its sum is empty too: divide by 1 rather than 0.
  auto over = [](const torch::Tensor& sum, double count) { return sum / std::max(count, 1.0); };
  Loss l;
  l.ce = over(s.ce, n.targets);
  l.z = s.z.defined() ? over(s.z, n.targets) * c.z_loss_coef : torch::zeros_like(l.ce);
  l.aux = s.aux.defined() ? over(s.aux, n.units) : torch::zeros_like(l.ce);
  l.mtp = torch::zeros_like(l.ce);
  const size_t depths = s.mtp_ce.size();
  for (size_t k = 0; k < depths; ++k) {
    l.mtp = l.mtp + over(s.mtp_ce[k], k < n.mtp_targets.size() ? n.mtp_targets[k] : 0.0);
    if (k < s.mtp_aux.size() && s.mtp_aux[k].defined())
      l.aux = l.aux + over(s.mtp_aux[k], k < n.mtp_units.size() ? n.mtp_units[k] : 0.0);
  }
  if (depths > 0) l.mtp = l.mtp / static_cast<double>(depths);
  l.total = l.ce + l.z + l.aux + c.mtp_loss_weight * l.mtp;
  return l;
}

}  // namespace dsopen::model
