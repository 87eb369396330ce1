#include "inference/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "model/fused_cpu.h"
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
  const bool penalties = opts_.repetition_penalty != 1.0 || opts_.frequency_penalty != 0.0 || opts_.presence_penalty != 0.0;
  if (opts_.temperature == 0.0 && !penalties) {  // plain greedy: the arg max of the float32 logits as they are
    const auto f = logits.to(torch::kCPU, torch::kFloat32).contiguous();
    const float* p = f.data_ptr<float>();
    const int64_t n = f.numel();
    const float best = model::kernels::detail::row_max(p, n);  // vectorised; then the first id that holds it
    const int64_t id = std::find(p, p + n, best) - p;
    return {{id < n ? id : 0, 1.0}};  // (all NaN: id 0, as before)
  }
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
  // Greedy is the limit of temperature -> 0: one candidate, the arg max (lowest id on ties).
  if (opts_.temperature == 0.0) {
    const int64_t best = std::max_element(v.begin(), v.end()) - v.begin();
    return {{best, 1.0}};
  }
  // Candidates in the order of a full stable sort (by logit, then id), but only the prefix top-k, min-p and top-p
  // can keep is ever ordered: sorting a 100k-token vocabulary per token would cost more than the model's step.
  const size_t V = v.size();
  std::vector<int64_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  const auto before = [&](int64_t a, int64_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); };
  size_t sorted = 0;
  // order[0, n) final, grown geometrically; order[0, sorted) already precedes everything after it, so only the rest
  // is (partially) sorted. Past a quarter of the vocabulary a full sort is cheaper than a heap.
  const auto sort_prefix = [&](size_t n) {
    n = std::min(V, std::max({n, 2 * sorted, size_t(64)}));
    if (n > V / 4) n = V;
    const auto from = order.begin() + static_cast<std::ptrdiff_t>(sorted);
    if (n == V && sorted < V) std::sort(from, order.end(), before);
    else if (n > sorted) std::partial_sort(from, order.begin() + static_cast<std::ptrdiff_t>(n), order.end(), before);
    sorted = n;
  };
  size_t keep = V;
  if (opts_.top_k > 0) keep = std::min(keep, static_cast<size_t>(opts_.top_k));
  sort_prefix(keep < V ? keep : 1);
  const double max_logit = v[order[0]];
  const auto weight = [&](int64_t id) { return std::exp((v[id] - max_logit) / opts_.temperature); };
  double sum = 0;  // over the candidates top-k keeps (the whole vocabulary: in id order)
  if (keep < V) for (size_t i = 0; i < keep; ++i) sum += weight(order[i]);
  else for (size_t id = 0; id < V; ++id) sum += weight(static_cast<int64_t>(id));
  std::vector<double> probs;  // of order[i], filled as far as needed
  const auto prob = [&](size_t i) {
    if (i >= sorted) sort_prefix(i + 1);
    while (probs.size() <= i) probs.push_back(weight(order[probs.size()]) / sum);
    return probs[i];
  };
  double scale = 1.0;  // min-p renormalises the prefix it keeps
  if (opts_.min_p > 0) {  // probs are sorted: keep the prefix at or above min_p * the first
    size_t n = 1;
    while (n < keep && prob(n) >= opts_.min_p * prob(0)) ++n;
    keep = n;
    double kept = 0;
    for (size_t i = 0; i < keep; ++i) kept += prob(i);
    scale = 1.0 / kept;
  }
  if (opts_.top_p < 1.0) {  // smallest prefix whose probability reaches top_p
    double cum = 0;
    size_t n = 0;
    while (n < keep && cum < opts_.top_p) cum += prob(n++) * scale;
    keep = std::max<size_t>(n, 1);
  }
  if (keep > sorted) sort_prefix(keep);
  std::vector<std::pair<int64_t, double>> out;
  double total = 0;
  for (size_t i = 0; i < keep; ++i) total += prob(i) * scale;
  for (size_t i = 0; i < keep; ++i) out.push_back({order[i], prob(i) * scale / total});
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
