// AdamW over flat buffers, and the learning-rate schedules.
//
// Every parameter of a group (decay / no decay) is re-pointed into one contiguous fp32 buffer, and so is its
// gradient, so an optimizer step is a handful of vectorized ops per group instead of a loop over hundreds of
// tensors (what PyTorch's fused/foreach AdamW buys), and a data-parallel strategy can reduce or shard the flat
// gradient buffer directly. No decay on 1-D parameters (norms, biases) or, unless asked, on embeddings.
#pragma once

#include <torch/torch.h>

#include <map>
#include <string>
#include <vector>

namespace dsopen::train {

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
  bool decay_embeddings = false;
};

class FlatAdamW {
public:
  FlatAdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, const AdamWOptions& options);

  void zero_grad();
  // Global L2 norm of all gradients (one sync).
  double grad_norm() const;
  void scale_grads(double factor);
  void step(double lr);

  int64_t step_count() const { return step_; }
  int64_t num_params() const;
  int64_t state_bytes() const;  // Adam moments
  int64_t grad_bytes() const;

  // Moments and step count, keyed for a safetensors file; load checks the flat layout matches.
  std::map<std::string, torch::Tensor> state_dict() const;
  void load_state_dict(const std::map<std::string, torch::Tensor>& state, const std::string& source);

  struct Group {
    std::string name;
    bool decay;
    torch::Tensor params, grads, m, v;  // flat fp32
    std::vector<std::string> names;
  };
  const std::vector<Group>& groups() const { return groups_; }

private:
  AdamWOptions opts_;
  std::vector<Group> groups_;
  int64_t step_ = 0;
};

struct ScheduleOptions {
  std::string kind = "cosine";  // cosine | linear | constant | wsd
  double lr = 3e-4, min_lr = 3e-5;
  int64_t warmup_steps = 0, max_steps = 1;
  double decay_fraction = 0.1;  // wsd
};
// Learning rate for optimizer step `step` (0-based): linear warmup from lr/warmup to lr, then the schedule
// from lr to min_lr at the last step.
double lr_at(int64_t step, const ScheduleOptions& s);

}  // namespace dsopen::train
