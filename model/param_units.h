// Parameter units: the pieces of the model that fully sharded data parallelism (ZeRO-3, train/sharded_units.h)
// gathers one at a time. A rank keeps only a slice of every parameter; the model calls UnitHooks around each use of
// a unit so that its parameters are whole exactly while they are needed, in forward and again in backward.
//
// Units, in forward order (FSDP's "wrap each transformer block", with the rest split as torchtitan does):
//   0          model.embed_tokens
//   1 .. L     model.layers.{0 .. L-1}
//   L + 1      model.norm
//   L + 2      lm_head (empty with tied embeddings: the head then uses unit 0)
//   L + 2 + k  MTP module k (mtp.{k-1}.*: its norms, eh_proj, decoder layer and shared_head.norm)
// The head is a unit of its own because the fused head + loss (model/fused_ops.h) computes its gradients in the
// forward pass: its backward needs no weights, so the head is not gathered again for it.
//
// Without hooks (inference, and every strategy but zero3) a UnitUse does nothing.
#pragma once

#include <torch/torch.h>

#include <memory>
#include <set>
#include <string>
#include <vector>

namespace dsopen::model {

struct ModelConfig;

int64_t unit_count(const ModelConfig& c);
// The unit of a parameter by its module name (model.layers.3.mlp.up_proj.weight -> 4); -1 for a name outside
// the model's modules.
int64_t unit_of(const std::string& module_name, const ModelConfig& c);

// Parameter names of the projections' weights (model/linear.h Linear, LoRA's torch::nn::Linear): parameters used
// once per forward pass, always through autocast's cast to the compute dtype, so gathering them in that dtype
// changes no value and their matmuls give the gradients they give unsharded. Embeddings, norms, biases and the MoE
// router (computed in fp32) are not among them, nor the head: every MTP depth uses it again, and the fused head +
// loss computes its gradient in fp32.
std::set<std::string> projection_weight_names(torch::nn::Module& model);

// What a sharding strategy does around a unit's use. The model calls, for every use:
//   before_forward          the parameters must be whole from now on
//   after_forward           the forward pass is done with them; `backward_hooked` says whether after_backward will
//                           follow for this use (false when no input of the use requires grad: the embedding)
//   before_backward         backward is about to need them again (called once per output whose gradient arrives;
//                           must be idempotent)
//   after_backward          backward of this use is complete: every gradient of its parameters has been accumulated
class UnitHooks {
public:
  virtual ~UnitHooks() = default;
  virtual void before_forward(int64_t unit) = 0;
  virtual void after_forward(int64_t unit, bool backward_hooked) = 0;
  virtual void before_backward(int64_t unit) = 0;
  virtual void after_backward(int64_t unit) = 0;
};

// One use of some units (usually one) over a scope. Tensors entering the use pass through inputs(): one autograd
// node, whose backward runs after_backward once every input's gradient is computed (FSDP2's multi-grad hook on the
// module inputs). Tensors leaving it pass through output(): an identity whose backward runs before_backward, so the
// parameters are gathered before any backward node of the use needs them.
class UnitUse {
public:
  UnitUse(UnitHooks* hooks, std::vector<int64_t> units);
  ~UnitUse();
  UnitUse(const UnitUse&) = delete;
  UnitUse& operator=(const UnitUse&) = delete;

  std::vector<torch::Tensor> inputs(const std::vector<torch::Tensor>& xs);
  torch::Tensor input(const torch::Tensor& x) { return inputs({x})[0]; }
  torch::Tensor output(const torch::Tensor& y);

private:
  UnitHooks* hooks_;
  std::vector<int64_t> units_;
  bool backward_hooked_ = false;
};

}  // namespace dsopen::model
