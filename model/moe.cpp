#include "model/moe.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>

#include "utils/compat.h"
#include "utils/errors.h"

namespace dsopen::model {

ExpertBlocks expert_blocks(const std::vector<int64_t>& counts, bool pad) {
  ExpertBlocks b;
  b.sizes = counts;
  std::vector<int64_t> shift(counts.size(), 0);
  int64_t real = 0;
  for (size_t e = 0; e < counts.size(); ++e) {
    if (pad && counts[e] > kExpertRowMultiple)
      b.sizes[e] = (counts[e] + kExpertRowMultiple - 1) / kExpertRowMultiple * kExpertRowMultiple;
    shift[e] = b.rows - real;
    b.rows += b.sizes[e];
    real += counts[e];
  }
  b.padded = b.rows != real;
  b.shift = torch::tensor(shift, torch::kLong);
  return b;
}

bool lowp_cpu_gemms(const torch::Tensor& x) {
  return x.is_cpu() && (x.scalar_type() != torch::kFloat32 || compat::autocast_enabled(c10::DeviceType::CPU));
}

Routing route(const torch::Tensor& logits, const torch::Tensor& bias, const ModelConfig& c) {
  const int64_t N = logits.size(0), E = logits.size(1), K = c.num_experts_per_tok;
  auto scores = c.scoring_func == "sigmoid" ? logits.sigmoid() : logits.softmax(-1);  // [N, E]
  auto choice = bias.defined() ? scores + bias.to(scores.scalar_type()) : scores;
  if (c.topk_method != "greedy" && c.n_group > 1) {
    auto grouped = choice.view({N, c.n_group, E / c.n_group});
    // V2 ranks a group by its best expert, V3 (noaux_tc) by the sum of its two best bias-corrected scores.
    auto group_scores = c.topk_method == "noaux_tc" ? std::get<0>(grouped.topk(2, -1)).sum(-1)
                                                    : std::get<0>(grouped.max(-1));  // [N, n_group]
    auto top_groups = std::get<1>(group_scores.topk(c.topk_group, -1));
    auto dropped = torch::ones({N, c.n_group}, logits.options().dtype(torch::kBool)).scatter(1, top_groups, false);
    // -inf, as DeepSeek's reference does: with a negative bias a 0 fill could let a dropped group's expert win.
    choice = grouped.masked_fill(dropped.unsqueeze(-1), -std::numeric_limits<float>::infinity()).view({N, E});
  }
  auto indices = std::get<1>(choice.topk(K, -1));  // [N, K]
  auto weights = scores.gather(1, indices);         // unbiased scores combine
  if (c.arch().routing_weights == RoutingWeights::kNormalizeThenScale) {
    if (c.norm_topk_prob) weights = weights / (weights.sum(-1, true) + 1e-20);
    if (c.routed_scaling_factor != 1.0) weights = weights * c.routed_scaling_factor;
  } else if (K > 1 && c.norm_topk_prob) {  // DeepSeek-V2 normalizes *or* scales
    weights = weights / (weights.sum(-1, true) + 1e-20);
  } else {
    weights = weights * c.routed_scaling_factor;
  }
  return {indices, weights, scores};
}

torch::Tensor balance_loss_sum(const torch::Tensor& scores, const torch::Tensor& indices, const torch::Tensor& valid,
                               int64_t batch, const ModelConfig& c) {
  const int64_t E = scores.size(1), K = indices.size(1);
  const int64_t units = c.seq_aux ? batch : 1;
  const int64_t T = scores.size(0) / units;
  auto w = valid.defined() ? valid.to(scores.scalar_type()).view({units, T})
                           : torch::ones({units, T}, scores.options());  // [units, T], 1 = counted
  auto counted = w.sum(1);                                                // T' per unit
  auto denom = counted.clamp_min(1).unsqueeze(1);                        // [units, 1]
  // Normalized affinities: softmax scores already sum to 1; sigmoid scores are normalized per token (V3 eq. 20).
  auto probs = c.scoring_func == "sigmoid" ? scores / scores.sum(-1, true) : scores;
  auto P = (probs.view({units, T, E}) * w.unsqueeze(2)).sum(1) / denom;  // [units, E]
  auto routed = w.unsqueeze(2).expand({units, T, K}).reshape({units, T * K});
  auto counts = torch::zeros({units, E}, scores.options()).scatter_add_(1, indices.view({units, T * K}), routed);
  auto f = counts * (static_cast<double>(E) / K) / denom;  // [units, E]
  return (f * P).sum() * c.aux_loss_alpha;  // units without a counted position contribute 0
}

int64_t balance_units(const torch::Tensor& valid, const ModelConfig& c) {
  if (!valid.defined()) return 0;
  if (!c.seq_aux) return valid.any().item<bool>() ? 1 : 0;
  return valid.any(1).sum().item<int64_t>();
}

torch::Tensor balance_loss(const torch::Tensor& scores, const torch::Tensor& indices, int64_t batch,
                           const ModelConfig& c) {
  return balance_loss_sum(scores, indices, {}, batch, c) / static_cast<double>(c.seq_aux ? batch : 1);
}

GateImpl::GateImpl(const ModelConfig& c) {
  weight = register_parameter("weight", torch::empty({c.n_routed_experts, c.hidden_size}));
  if (!SkipWeightInit::active()) torch::nn::init::normal_(weight, 0.0, c.initializer_range);
  if (c.topk_method == "noaux_tc")
    e_score_correction_bias = register_buffer("e_score_correction_bias", torch::zeros({c.n_routed_experts}));
}

MoEImpl::MoEImpl(const ModelConfig& c) : config_(c), placement_(ExpertPlacementScope::current()) {
  const ArchTraits& a = c.arch();
  if (c.n_routed_experts % placement_.size != 0)
    throw usage_error("parallel.expert_parallel", std::to_string(c.n_routed_experts) + " routed experts do not divide among " +
                                                      std::to_string(placement_.size) + " expert-parallel ranks",
                      "choose an expert_parallel that divides n_routed_experts");
  gate = register_module("gate", Gate(c));
  experts = register_module("experts", std::make_shared<torch::nn::Module>());
  const int64_t first = placement_.first(c.n_routed_experts);
  {
    // The experts' default initialization draws from the global generator; whatever share is built, the rest of the
    // model must see the same stream (CausalLM::init_weights gives each expert its own generator).
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    const auto state = gen.get_state();  // (not under gen.mutex(): the initializers below take it)
    for (int64_t e = first; e < first + placement_.count(c.n_routed_experts); ++e) {
      expert_list_.push_back(MLP(c.hidden_size, c.moe_intermediate_size, MLPKind::kSeparate, a.expert_proj));
      experts->register_module(std::to_string(e), expert_list_.back());
    }
    gen.set_state(state);
  }
  if (a.shared == SharedExperts::kPlain && c.n_shared_experts > 0)
    shared_experts = register_module("shared_experts", MLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts));
  if (a.shared == SharedExperts::kGated) {
    shared_expert = register_module("shared_expert", MLP(c.hidden_size, c.shared_expert_intermediate_size));
    shared_expert_gate = register_module("shared_expert_gate", linear(c.hidden_size, 1));
  }
}

MLP MoEImpl::expert(int64_t e) const {
  const int64_t first = placement_.first(config_.n_routed_experts);
  if (e < first || e >= first + static_cast<int64_t>(expert_list_.size()))
    throw std::out_of_range("MoE: expert " + std::to_string(e) + " is held by another expert-parallel rank");
  return expert_list_[static_cast<size_t>(e - first)];
}

torch::Tensor MoEImpl::run_blocks(const torch::Tensor& x, const std::vector<int64_t>& sizes,
                                  const std::vector<int64_t>& real, bool all) {
  // One split (its backward concatenates the block gradients once) rather than a narrow per expert, whose backward
  // would allocate and fill a full gradient for every expert.
  auto parts = x.split_with_sizes(sizes, 0);
  std::vector<torch::Tensor> outs;
  for (size_t l = 0; l < expert_list_.size(); ++l)
    if (real[l] > 0 || all) outs.push_back(expert_list_[l]->forward(parts[l]));
  return torch::cat(outs, 0);
}

ExpertRows MoEImpl::local_experts(const torch::Tensor& flat, const torch::Tensor& token_of,
                                  const std::vector<int64_t>& counts, const torch::Tensor& sorted_experts,
                                  const torch::Tensor& w_sorted) {
  const ExpertBlocks blocks = expert_blocks(counts, lowp_cpu_gemms(flat));
  // In training every expert runs, an idle one on zero rows: its (zero) gradient then arrives like any other, which
  // keeps data-parallel gradient buckets complete and issued in the same order on every rank.
  const bool all = is_training() && torch::GradMode::is_enabled();
  auto src = token_of, w_rows = w_sorted;
  if (blocks.padded) {
    // Padding rows read token 0 and carry weight 0: their outputs add nothing and their gradients are zero.
    auto dest = torch::arange(token_of.size(0), token_of.options()) +
                blocks.shift.to(token_of.device()).index_select(0, sorted_experts);
    src = torch::zeros({blocks.rows}, token_of.options()).index_copy(0, dest, token_of);
    w_rows = torch::zeros({blocks.rows}, w_sorted.options()).index_copy(0, dest, w_sorted);
  }
  return {run_blocks(flat.index_select(0, src), blocks.sizes, counts, all), src, w_rows};
}

ExpertRows MoEImpl::remote_experts(const torch::Tensor& flat, const torch::Tensor& token_of,
                                   const std::vector<int64_t>& counts, const torch::Tensor& w_sorted) {
  if (!exchange_ || exchange_->size() != placement_.size)
    throw std::logic_error("MoE: an expert-parallel block needs an exchange over its " + std::to_string(placement_.size) +
                           " ranks (CausalLM::set_expert_exchange)");
  const int64_t P = placement_.size, L = placement_.count(config_.n_routed_experts);
  // 1. Every rank learns how many rows it receives for each of its experts from each rank.
  auto received = exchange_->all_to_all(torch::tensor(counts, torch::kLong), std::vector<int64_t>(P, L),
                                        std::vector<int64_t>(P, L)).cpu();
  const ReceivedLayout layout = received_layout(received, L);
  std::vector<int64_t> send(static_cast<size_t>(P), 0);
  for (int64_t j = 0; j < P; ++j)
    for (int64_t l = 0; l < L; ++l) send[j] += counts[static_cast<size_t>(j * L + l)];
  // 2. The rows travel to their experts (sorted by expert = grouped by owner), are regrouped by local expert (and
  //    padded for oneDNN, see expert_blocks), run, regrouped by source and sent back.
  auto x_recv = exchange_rows(*exchange_, flat.index_select(0, token_of), send, layout.per_source);  // [R, D]
  const ExpertBlocks blocks = expert_blocks(layout.per_expert, lowp_cpu_gemms(flat));
  auto pos = layout.to_expert_order.to(flat.device());
  if (blocks.padded) {
    std::vector<int64_t> real_start(static_cast<size_t>(L), 0);
    for (int64_t l = 1; l < L; ++l) real_start[l] = real_start[l - 1] + layout.per_expert[l - 1];
    auto expert_of = torch::bucketize(layout.to_expert_order, torch::tensor(real_start, torch::kLong), false, /*right=*/true) - 1;
    pos = pos + blocks.shift.index_select(0, expert_of).to(flat.device());
  }
  auto src = torch::zeros({blocks.rows}, pos.options()).index_copy(0, pos, torch::arange(pos.size(0), pos.options()));
  // Every held expert runs, even on zero rows, so every rank's output has the same dtype and the bucket order holds.
  auto y_local = run_blocks(x_recv.index_select(0, src), blocks.sizes, layout.per_expert, /*all=*/true);
  return {exchange_rows(*exchange_, y_local.index_select(0, pos), layout.per_source, send), token_of, w_sorted};
}

MoEOutput MoEImpl::forward(const torch::Tensor& x, const torch::Tensor& token_mask) {
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2), K = config_.num_experts_per_tok;
  const int64_t E = config_.n_routed_experts;
  auto flat = x.reshape({B * T, D});  // [N, D]
  if (is_training() && config_.router_jitter_noise > 0) {  // Mixtral: multiplicative noise on what gate and experts see
    const double j = config_.router_jitter_noise;
    flat = flat * torch::empty_like(flat).uniform_(1.0 - j, 1.0 + j);
  }
  Routing r;
  {
    // Routing decisions in full precision, as the reference does, whatever the surrounding autocast.
    compat::AutocastScope fp32_cpu(c10::DeviceType::CPU, false), fp32_cuda(c10::DeviceType::CUDA, false);
    auto logits = torch::nn::functional::linear(flat.to(torch::kFloat32), gate->weight.to(torch::kFloat32));
    r = route(logits, gate->e_score_correction_bias, config_);
  }

  // Sort the N*K (token, expert) pairs by expert so each expert sees one contiguous block.
  auto flat_experts = r.indices.reshape({-1});                      // [N*K]
  auto load = torch::bincount(flat_experts, {}, E);                 // [E], every position: the dispatch sizes
  auto load_cpu = load.to(torch::kCPU);                              // one sync: block sizes
  std::vector<int64_t> counts(load_cpu.data_ptr<int64_t>(), load_cpu.data_ptr<int64_t>() + E);
  torch::Tensor order, dropped;
  if (is_training() && config_.capacity_factor > 0) {
    // Within each expert's block the pairs go by descending weight; those past the capacity are dropped.
    const int64_t capacity = static_cast<int64_t>(std::ceil(config_.capacity_factor * static_cast<double>(B * T * K) / E));
    auto by_weight = r.weights.reshape({-1}).argsort(/*stable=*/true, 0, /*descending=*/true);
    order = by_weight.index_select(0, flat_experts.index_select(0, by_weight).argsort(/*stable=*/true));
    std::vector<int64_t> keep_index;
    int64_t start = 0, kept = 0;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = std::min(counts[e], capacity);
      for (int64_t i = 0; i < n; ++i) keep_index.push_back(start + i);
      start += counts[e];
      kept += n;
      counts[e] = n;
    }
    order = order.index_select(0, torch::tensor(keep_index, torch::kLong).to(order.device()));
    dropped = torch::tensor({B * T * K - kept, B * T * K}, torch::kLong);
  } else {
    order = flat_experts.argsort(/*stable=*/true);
  }
  auto token_of = order.div(K, "floor");                            // source token of each sorted pair
  auto w_sorted = r.weights.reshape({-1}).index_select(0, order);   // [N*K] routing weight of each sorted pair
  const ExpertRows rows = placement_.sharded()
                              ? remote_experts(flat, token_of, counts, w_sorted)
                              : local_experts(flat, token_of, counts, flat_experts.index_select(0, order), w_sorted);
  // One weighted scatter-add back to the tokens.
  auto y = torch::zeros({B * T, D}, rows.y.options())
               .index_add(0, rows.token, rows.y * rows.weight.unsqueeze(1).to(rows.y.scalar_type()));
  if (shared_experts) y = y + shared_experts(flat).to(y.scalar_type());
  if (shared_expert) y = y + (torch::sigmoid(shared_expert_gate(flat)) * shared_expert(flat)).to(y.scalar_type());

  MoEOutput out;
  out.y = y.view({B, T, D}).to(x.scalar_type());
  out.dropped = dropped;
  // Statistics count only the masked-in positions (padding routes somewhere too, but is no one's load).
  const torch::Tensor valid = token_mask.defined() ? token_mask.reshape({B * T}).to(torch::kBool) : torch::Tensor();
  out.load = valid.defined() ? torch::bincount(r.indices.masked_select(valid.unsqueeze(1)), {}, E) : load.detach();
  out.aux_sum = (is_training() && config_.aux_loss_alpha > 0)
                    ? balance_loss_sum(r.scores, r.indices, valid, B, config_)
                    : torch::zeros({}, x.options().dtype(torch::kFloat32));
  return out;
}

void MoEImpl::update_bias(const torch::Tensor& load, double speed) {
  auto& bias = gate->e_score_correction_bias;
  if (!bias.defined() || speed == 0.0) return;
  torch::NoGradGuard no_grad;
  auto l = load.to(bias.device(), torch::kFloat32);
  bias.add_(torch::sign(l.mean() - l) * speed);
}

}  // namespace dsopen::model
