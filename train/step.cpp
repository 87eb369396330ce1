#include "train/step.h"

#include <cmath>

#include "utils/errors.h"

namespace dsopen::train {

model::ForwardInput forward_input(const data::Batch& b, torch::Device device) {
  auto to = [&](const torch::Tensor& t) { return t.defined() ? t.to(device) : torch::Tensor(); };
  return {to(b.input_ids), to(b.labels), nullptr, to(b.position_ids), to(b.segment_ids)};
}

TrainStep::TrainStep(model::CausalLM model, DataParallel& dp, Precision& precision, torch::Device device,
                     StepOptions options)
    : model_(std::move(model)), dp_(dp), precision_(precision), device_(device), options_(options), balancer_(*model_) {}

model::LossCounts TrainStep::global_counts(const std::vector<data::Batch>& micro_batches) {
  model::LossCounts counts;
  for (const auto& b : micro_batches) counts += model::count_loss_targets(model_->config(), b.labels, b.segment_ids);
  ProcessGroup& group = dp_.group();
  if (group.size() > 1) {
    auto all = torch::tensor(counts.to_vector(), torch::kFloat64).to(group.device());
    group.all_reduce_sum(all).wait();
    all = all.cpu();
    counts = model::LossCounts::from_vector(std::vector<double>(all.data_ptr<double>(), all.data_ptr<double>() + all.numel()));
  }
  if (counts.targets == 0) throw runtime_error("data", "a global batch has no target tokens", "check the SFT data and template");
  return counts;
}

void TrainStep::forward_backward(const std::vector<data::Batch>& micro_batches, const model::LossCounts& counts,
                                 StepStats& stats) {
  for (size_t k = 0; k < micro_batches.size(); ++k) {
    dp_.begin_micro_step(k + 1 == micro_batches.size());
    model::ForwardOutput out;
    {
      std::optional<compat::AutocastScope> autocast;
      precision_.autocast(autocast);
      out = model_->forward(forward_input(micro_batches[k], device_));
    }
    // This micro-batch's share of the global loss: its sums over the global counts. Gradients are summed over
    // micro-batches and ranks, so the shares add up to the loss of the whole batch.
    const model::Loss loss = model::compose_loss(out.sums, counts, model_->config());
    auto objective = precision_.scaling() ? loss.total * precision_.scale() : loss.total;
    objective.backward();
    dp_.end_micro_step();
    stats.loss += loss.ce.item<double>();
    stats.aux_loss += loss.aux.item<double>();
    stats.mtp_loss += loss.mtp.item<double>();
    stats.z_loss += loss.z.item<double>();
    balancer_.add(out.expert_load);
    if (out.moe_dropped.defined()) {
      stats.moe_dropped += static_cast<double>(out.moe_dropped[0].item<int64_t>());
      stats.moe_routed += static_cast<double>(out.moe_dropped[1].item<int64_t>());
    }
  }
}

void TrainStep::reduce_logged(StepStats& stats) {
  ProcessGroup& group = dp_.group();
  if (group.size() == 1) return;
  // One all-reduce for the logged losses and the expert loads (every rank must update the routing biases alike).
  auto all = torch::cat({torch::tensor({stats.loss, stats.aux_loss, stats.mtp_loss, stats.z_loss, stats.moe_dropped,
                                        stats.moe_routed}, torch::kFloat64),
                         balancer_.packed()})
                 .to(group.device());
  group.all_reduce_sum(all).wait();
  all = all.cpu();
  stats.loss = all[0].item<double>();
  stats.aux_loss = all[1].item<double>();
  stats.mtp_loss = all[2].item<double>();
  stats.z_loss = all[3].item<double>();
  stats.moe_dropped = all[4].item<double>();
  stats.moe_routed = all[5].item<double>();
  balancer_.unpack(all.narrow(0, 6, all.numel() - 6));
}

StepStats TrainStep::run(const std::vector<data::Batch>& micro_batches, double lr) {
  StepStats stats;
  const model::LossCounts counts = global_counts(micro_batches);
  stats.targets = counts.targets;
  dp_.zero_grad();
  balancer_.reset();
  forward_backward(micro_batches, counts, stats);
  reduce_logged(stats);
  if (precision_.scaling()) dp_.scale_grads(1.0 / precision_.scale());
  stats.grad_norm = dp_.grad_norm();
  const bool finite = std::isfinite(stats.grad_norm) && std::isfinite(stats.loss);
  precision_.update(finite);  // fp16: back off the loss scale, or grow it after a run of good steps
  if (!finite) return stats;
  if (options_.grad_clip > 0 && stats.grad_norm > options_.grad_clip)
    dp_.scale_grads(options_.grad_clip / (stats.grad_norm + 1e-6));
  dp_.step(lr);
  if (options_.update_routing_bias) balancer_.update_biases(model_->config().bias_update_speed);
  stats.applied = true;
  return stats;
}

}  // namespace dsopen::train
