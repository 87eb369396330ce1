#include "model/moe_balance.h"

namespace dsopen::model {

MoEBalancer::MoEBalancer(const CausalLMImpl& model) : blocks_(model.moe_blocks()) {
  loads_ = torch::zeros({static_cast<int64_t>(blocks_.size()), model.config().n_routed_experts}, torch::kFloat64);
}

void MoEBalancer::reset() { loads_.zero_(); }

void MoEBalancer::add(const std::vector<torch::Tensor>& expert_load) {
  TORCH_CHECK(expert_load.size() <= blocks_.size(), "MoEBalancer::add: ", expert_load.size(), " loads for ",
              blocks_.size(), " MoE blocks");
  for (size_t i = 0; i < expert_load.size(); ++i)
    loads_[static_cast<int64_t>(i)] += expert_load[i].to(torch::kCPU, torch::kFloat64);
}

void MoEBalancer::unpack(const torch::Tensor& flat) {
  loads_.copy_(flat.to(torch::kCPU, torch::kFloat64).view(loads_.sizes()));
}

void MoEBalancer::update_biases(double speed) {
  for (size_t i = 0; i < blocks_.size(); ++i) blocks_[i].moe->update_bias(load(i), speed);
}

std::vector<double> MoEBalancer::imbalance_per_block() const {
  std::vector<double> out;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    auto l = load(i);
    const double mean = l.mean().item<double>();
    out.push_back(mean > 0 ? l.max().item<double>() / mean : 0.0);
  }
  return out;
}

double MoEBalancer::imbalance() const {
  const auto per = imbalance_per_block();
  double sum = 0;
  for (double v : per) sum += v;
  return per.empty() ? 0.0 : sum / per.size();
}

}  // namespace dsopen::model
