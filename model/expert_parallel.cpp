#include "model/expert_parallel.h"

#include <regex>

namespace dsopen::model {

namespace {

thread_local ExpertPlacement g_placement;
thread_local bool g_recomputing = false;

// The exchange rides in the autograd context as an integer: the model owns it and outlives every graph it builds.
struct AllToAllFunction : public torch::autograd::Function<AllToAllFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& in, int64_t exchange,
                               std::vector<int64_t> send, std::vector<int64_t> recv) {
    ctx->saved_data["exchange"] = exchange;
    ctx->saved_data["send"] = send;
    ctx->saved_data["recv"] = recv;
    return reinterpret_cast<ExpertExchange*>(exchange)->all_to_all(in.contiguous(), send, recv);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad) {
    auto* exchange = reinterpret_cast<ExpertExchange*>(ctx->saved_data["exchange"].toInt());
    const auto send = ctx->saved_data["send"].toIntVector(), recv = ctx->saved_data["recv"].toIntVector();
    return {exchange->all_to_all(grad[0].contiguous(), recv, send), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

ExpertPlacementScope::ExpertPlacementScope(ExpertPlacement placement) : saved_(g_placement) {
  g_placement = placement;
}
ExpertPlacementScope::~ExpertPlacementScope() { g_placement = saved_; }
ExpertPlacement ExpertPlacementScope::current() { return g_placement; }

RecomputeScope::RecomputeScope() : saved_(g_recomputing) { g_recomputing = true; }
RecomputeScope::~RecomputeScope() { g_recomputing = saved_; }
bool RecomputeScope::active() { return g_recomputing; }

torch::Tensor exchange_rows(ExpertExchange& exchange, const torch::Tensor& in, const std::vector<int64_t>& send,
                            const std::vector<int64_t>& recv) {
  return AllToAllFunction::apply(in, static_cast<int64_t>(reinterpret_cast<intptr_t>(&exchange)), send, recv);
}

ReceivedLayout received_layout(const torch::Tensor& counts, int64_t local_experts) {
  const int64_t L = local_experts, S = counts.numel() / L;
  const auto c = counts.contiguous();
  const int64_t* n = c.data_ptr<int64_t>();
  ReceivedLayout out;
  out.per_expert.assign(static_cast<size_t>(L), 0);
  out.per_source.assign(static_cast<size_t>(S), 0);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t l = 0; l < L; ++l) out.per_expert[l] += n[s * L + l], out.per_source[s] += n[s * L + l];
  // Next free position of each expert's block in the expert-grouped order; sources arrive in rank order.
  std::vector<int64_t> next(static_cast<size_t>(L), 0);
  for (int64_t l = 1; l < L; ++l) next[l] = next[l - 1] + out.per_expert[l - 1];
  int64_t rows = 0;
  for (auto r : out.per_source) rows += r;
  out.to_expert_order = torch::empty({rows}, torch::kLong);
  int64_t* pos = out.to_expert_order.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s)
    for (int64_t l = 0; l < L; ++l)
      for (int64_t k = 0; k < n[s * L + l]; ++k) *pos++ = next[l]++;
  return out;
}

bool is_routed_expert_name(const std::string& name) {
  static const std::regex expert(R"((^|\.)experts\.[0-9]+\.)");
  return std::regex_search(name, expert);
}

}  // namespace dsopen::model
