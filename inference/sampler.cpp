#include "inference/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "utils/errors.h"

namespace dsopen::inference {

Sampler::Sampler(const SamplingOptions& o) : opts_(o), rng_(o.seed) {
  if (o.temperature < 0) throw usage_error("--temperature", "must be >= 0");
  if (o.top_k < 0) throw usage_error("--top-k", "must be >= 0");
  if (!(o.top_p > 0 && o.top_p <= 1)) throw usage_error("--top-p", "must be in (0, 1]");
  if (!(o.repetition_penalty > 0)) throw usage_error("--repetition-penalty", "must be > 0");
  if (!(std::abs(o.frequency_penalty) <= 2)) throw usage_error("frequency_penalty", "must be in [-2, 2]");
  if (!(std::abs(o.presence_penalty) <= 2)) throw usage_error("presence_penalty", "must be in [-2, 2]");
  if (!(o.min_p >= 0 && o.min_p <= 1)) throw usage_error("min_p", "must be in [0, 1]");
}

std::vector<std::pair<int64_t, double>> Sampler::candidates(const torch::Tensor& logits,
                                                            const std::vector<int32_t>& context,
                                                            size_t generated_from) const {
  auto l = logits.to(torch::kCPU, torch::kFloat64).contiguous();
  std::vector<double> v(l.data_ptr<double>(), l.data_ptr<double>() + l.numel());
  // CTRL's rule, once per distinct token of the context however often it occurs (as transformers applies it).
  if (opts_.repetition_penalty != 1.0) {
    std::vector<char> penalized(v.size(), 0);
    for (int32_t t : context)
      if (t >= 0 && t < static_cast<int32_t>(v.size()) && !penalized[t]) {
        penalized[t] = 1;
        v[t] = v[t] > 0 ? v[t] / opts_.repetition_penalty : v[t] * opts_.repetition_penalty;
      }
  }
  if (opts_.frequency_penalty != 0.0 || opts_.presence_penalty != 0.0) {
    std::vector<int32_t> count(v.size(), 0);
    for (size_t i = std::min(generated_from, context.size()); i < context.size(); ++i)
      if (context[i] >= 0 && context[i] < static_cast<int32_t>(v.size())) ++count[context[i]];
    for (size_t t = 0; t < v.size(); ++t)
      if (count[t] > 0) v[t] -= opts_.frequency_penalty * count[t] + opts_.presence_penalty;
  }
  std::vector<int64_t> order(v.size());
  std::iota(order.begin(), order.end(), 0);
  // Greedy is the limit of temperature -> 0: one candidate, the arg max (lowest id on ties).
  if (opts_.temperature == 0.0) {
    const int64_t best = std::max_element(v.begin(), v.end()) - v.begin();
    return {{best, 1.0}};
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return v[a] > v[b]; });
  size_t keep = order.size();
  if (opts_.top_k > 0) keep = std::min(keep, static_cast<size_t>(opts_.top_k));
  std::vector<double> probs(keep);
  const double max_logit = v[order[0]];
  double sum = 0;
  for (size_t i = 0; i < keep; ++i) sum += probs[i] = std::exp((v[order[i]] - max_logit) / opts_.temperature);
  for (auto& p : probs) p /= sum;
  if (opts_.min_p > 0) {  // probs are sorted: keep the prefix at or above min_p * the first
    size_t n = 1;
    while (n < keep && probs[n] >= opts_.min_p * probs[0]) ++n;
    keep = n;
    probs.resize(keep);
    double kept = 0;
    for (double q : probs) kept += q;
    for (auto& q : probs) q /= kept;
  }
  if (opts_.top_p < 1.0) {  // smallest prefix whose probability reaches top_p
    double cum = 0;
    size_t n = 0;
    while (n < keep && cum < opts_.top_p) cum += probs[n++];
    keep = std::max<size_t>(n, 1);
  }
  std::vector<std::pair<int64_t, double>> out;
  double total = 0;
  for (size_t i = 0; i < keep; ++i) total += probs[i];
  for (size_t i = 0; i < keep; ++i) out.push_back({order[i], probs[i] / total});
  return out;
}

int64_t Sampler::sample(const torch::Tensor& logits, const std::vector<int32_t>& context, size_t generated_from) {
  const auto c = candidates(logits, context, generated_from);
  if (c.size() == 1) return c.front().first;
  double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
  for (const auto& [id, p] : c) {
    if (u < p) return id;
    u -= p;
  }
  return c.back().first;
}

}  // namespace dsopen::inference
