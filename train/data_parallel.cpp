#include "train/data_parallel.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/variable.h>

#include <chrono>

#include "utils/config.h"
#include "utils/errors.h"

namespace dsopen::train {

const std::vector<std::pair<std::string, Strategy>>& strategy_names() {
  static const std::vector<std::pair<std::string, Strategy>> names = {
      {"none", Strategy::None}, {"ddp", Strategy::Ddp},     {"zero1", Strategy::Zero1},
      {"zero2", Strategy::Zero2}, {"zero3", Strategy::Zero3}};
  return names;
}

std::string to_string(Strategy s) { return config::name_of(s, strategy_names()); }

namespace {

// Runs after AccumulateGrad has added a parameter's gradient: the moment its bucket may be complete.
struct GradReadyHook final : torch::autograd::FunctionPostHook {
  GradReadyHook(DataParallel* dp, size_t index) : dp(dp), index(index) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list&) override {
    dp->on_grad_ready(index);
    return outputs;
  }
  DataParallel* dp;
  size_t index;
};

// zero3 with expert parallelism: the replicated part's units, then the routed experts' (gathered over the ranks
// holding the same experts). Every rank calls both in the same order, so each group's collectives match up.
class BothUnits final : public model::UnitHooks {
public:
  BothUnits(model::UnitHooks* a, model::UnitHooks* b) : a_(a), b_(b) {}
  void before_forward(int64_t u) override { a_->before_forward(u), b_->before_forward(u); }
  void after_forward(int64_t u, bool hooked) override { a_->after_forward(u, hooked), b_->after_forward(u, hooked); }
  void before_backward(int64_t u) override { a_->before_backward(u), b_->before_backward(u); }
  void after_backward(int64_t u) override { a_->after_backward(u), b_->after_backward(u); }

private:
  model::UnitHooks *a_, *b_;
};

}  // namespace

model::UnitHooks* DataParallel::unit_hooks() {
  if (!units_) return nullptr;
  if (!experts_ || !experts_->units_) return units_.get();
  if (!both_units_) both_units_ = std::make_unique<BothUnits>(units_.get(), experts_->units_.get());
  return both_units_.get();
}

struct DataParallel::BucketState {
  FlatGroup* group;
  const FlatBucket* bucket;
  size_t remaining = 0;    // parameters whose gradient has not arrived in this micro-step
  bool ready = false;     // every parameter's gradient arrived
  bool launched = false;
  torch::Tensor scratch;   // zero2: the whole bucket's local gradient until it is reduce-scattered
  std::vector<char> seen;  // per parameter of the bucket
};

struct DataParallel::Pending {
  PendingWork work;
  size_t bucket;
  torch::Tensor scratch, out;  // zero2: input kept alive, and this rank's reduced slice
};

DataParallel::DataParallel(const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
                           const AdamWOptions& adamw, const DataParallelOptions& options,
                           std::shared_ptr<ProcessGroup> group, ExpertShards experts)
    : options_(options), group_(std::move(group)) {
  if (experts.replicas) {
    experts_ = std::make_unique<DataParallel>(experts.params, adamw, options_, experts.replicas);
    expert_group_ = experts.experts;
  }
  const Strategy s = options_.strategy;
  if (s == Strategy::None && group_->size() > 1)
    throw usage_error("parallel.strategy", "is none (one process), but " + std::to_string(group_->size()) +
                                               " ranks were started",
                      "set parallel.strategy to ddp, zero1, zero2 or zero3");
  ShardingOptions sh;
  sh.rank = group_->rank();
  sh.world_size = group_->size();
  sh.shard_state = s == Strategy::Zero1 || s == Strategy::Zero2 || s == Strategy::Zero3;
  sh.whole_grads = s != Strategy::Zero2 && s != Strategy::Zero3;
  sh.bucket_numel = std::max<int64_t>(1, static_cast<int64_t>(options_.bucket_mb * 1e6 / 4));
  if (s == Strategy::None) sh.bucket_numel = 0;
  sh.offload = options_.offload_optimizer;
  if (s == Strategy::Zero3) {
    // Every rank cuts its slices from rank 0's values: broadcast them while each rank still holds them whole.
    if (group_->size() > 1 && options_.units.broadcast) {
      torch::NoGradGuard no_grad;
      for (const auto& [name, p] : named_params)
        if (p.requires_grad()) group_->broadcast(p.detach(), 0).wait();
    }
    sh.shard_params = true;
    sh.unit_of = options_.units.unit_of;
    sh.low_precision = options_.units.low_precision;
    sh.device = options_.units.device;
  }
  opt_ = std::make_unique<FlatAdamW>(named_params, adamw, sh);
  if (s == Strategy::Zero3) {
    std::vector<FlatParams*> layouts{&opt_->params()};
    // A LoRA run's frozen base is sharded and gathered alike, without gradients or moments.
    bool any_frozen = false;
    for (const auto& [name, p] : named_params) any_frozen = any_frozen || !p.requires_grad();
    if (any_frozen) {
      ShardingOptions fr = sh;
      fr.frozen = true;
      fr.offload = false;
      frozen_ = std::make_unique<FlatParams>(named_params, false, fr);
      layouts.push_back(frozen_.get());
    }
    units_ = std::make_unique<ShardedUnits>(layouts, *group_, options_.units.units, options_.units.layers,
                                            options_.units.compute_dtype);
    return;
  }
  if (s == Strategy::None) return;

  for (auto& g : opt_->params().groups()) {
    for (const auto& b : g.buckets) {
      auto st = std::make_unique<BucketState>();
      st->group = &g;
      st->bucket = &b;
      st->remaining = b.params.size();
      st->seen.assign(b.params.size(), 0);
      for (size_t k = 0; k < b.params.size(); ++k) {
        param_slot_.push_back({buckets_.size(), k});
        auto acc = torch::autograd::impl::grad_accumulator(g.tensors[b.params[k]]);
        const uintptr_t key = acc->add_post_hook(std::make_unique<GradReadyHook>(this, param_slot_.size() - 1));
        hooks_.push_back({acc, key});
      }
      buckets_.push_back(std::move(st));
    }
  }
}

DataParallel::~DataParallel() {
  for (auto& [node, key] : hooks_) node->del_post_hook(key);
}

void DataParallel::broadcast_parameters() {
  if (experts_) experts_->broadcast_parameters();  // from the first rank that holds the same experts
  if (group_->size() == 1 || units_) return;
  torch::NoGradGuard no_grad;
  for (auto& g : opt_->params().groups()) group_->broadcast(g.params, 0).wait();
  opt_->params().refresh_master();  // the offloaded master copy must follow
}

void DataParallel::zero_grad() {
  opt_->zero_grad();
  if (experts_) experts_->zero_grad();
}

void DataParallel::begin_micro_step(bool last) {
  if (experts_) experts_->begin_micro_step(last);
  last_micro_step_ = last;
  next_launch_ = 0;
  for (auto& b : buckets_) {
    b->remaining = b->bucket->params.size();
    b->ready = b->launched = false;
    std::fill(b->seen.begin(), b->seen.end(), 0);
  }
}

void DataParallel::on_grad_ready(size_t index) {
  const auto [bi, k] = param_slot_[index];
  BucketState& b = *buckets_[bi];
  const bool zero2 = options_.strategy == Strategy::Zero2;
  if (!zero2 && !last_micro_step_) return;  // ddp/zero1 accumulate locally until the last micro-step
  if (b.launched)
    throw runtime_error("parallel", "a gradient arrived after its bucket was reduced (parameter " +
                                        b.group->names[b.bucket->params[k]] + ")",
                        "a parameter is used in two backward passes of one micro-step; this is not supported");
  if (zero2) {
    torch::NoGradGuard no_grad;
    auto& p = b.group->tensors[b.bucket->params[k]];
    if (!b.scratch.defined()) {
      b.scratch = torch::zeros({b.bucket->numel}, b.group->params.options());
      scratch_bytes_ += b.scratch.numel() * 4;
      peak_scratch_bytes_ = std::max(peak_scratch_bytes_, scratch_bytes_);
    }
    if (p.grad().defined()) {
      const int64_t off = b.group->offsets[b.bucket->params[k]] - b.bucket->offset;
      b.scratch.narrow(0, off, p.numel()).view(p.sizes()).add_(p.grad());
      p.mutable_grad().reset();  // the whole-size gradient is not kept
    }
  }
  if (!b.seen[k]) {
    b.seen[k] = 1;
    if (--b.remaining == 0) {
      b.ready = true;
      // Collectives must be issued in the same order on every rank, and ranks see different data (an expert
      // without tokens gives no gradient), so buckets go strictly in index order, as PyTorch's DDP does.
      while (next_launch_ < buckets_.size() && buckets_[next_launch_]->ready) launch(next_launch_++);
    }
  }
}

void DataParallel::launch(size_t bi) {
  BucketState& b = *buckets_[bi];
  b.launched = true;
  // Bound the memory in flight: at most two buckets travel at once.
  while (pending_.size() >= 2) complete_oldest();
  auto p = std::make_unique<Pending>();
  p->bucket = bi;
  if (options_.strategy == Strategy::Zero2) {
    if (!b.scratch.defined()) b.scratch = torch::zeros({b.bucket->numel}, b.group->params.options());  // no grads came
    p->scratch = b.scratch;
    b.scratch = torch::Tensor();
    p->out = torch::empty({b.bucket->numel / group_->size()}, b.group->params.options());
    p->work = group_->reduce_scatter_sum(p->out, p->scratch);
  } else {
    p->work = group_->all_reduce_sum(b.group->grads.narrow(0, b.bucket->offset, b.bucket->numel));
  }
  pending_.push_back(std::move(p));
}

void DataParallel::complete_oldest() {
  auto p = std::move(pending_.front());
  pending_.erase(pending_.begin());
  const auto t0 = std::chrono::steady_clock::now();
  p->work.wait();
  comm_wait_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (p->out.defined()) {
    const BucketState& b = *buckets_[p->bucket];
    torch::NoGradGuard no_grad;
    b.group->shard_grads.narrow(0, b.bucket->shard_offset, p->out.numel()).add_(p->out);
    scratch_bytes_ -= p->scratch.numel() * 4;
  }
}

void DataParallel::end_micro_step() {
  if (experts_) experts_->end_micro_step();
  if (units_) units_->finish_micro_step();
  if (buckets_.empty()) return;
  const bool communicate = options_.strategy == Strategy::Zero2 || last_micro_step_;
  // Buckets some of whose parameters got no gradient (unused experts, frozen paths) go now, in order.
  if (communicate)
    while (next_launch_ < buckets_.size()) launch(next_launch_++);
  while (!pending_.empty()) complete_oldest();
}

double DataParallel::grad_norm() {
  const double local = opt_->grad_norm();
  // Whole gradients are identical on every rank after the all-reduce; slices add up over the group.
  double squared = opt_->sharding().whole_grads ? local * local : group_->all_reduce_sum(local * local);
  if (experts_) {
    const double e = experts_->grad_norm();  // this rank's share of the experts, whole over its replicas
    squared += expert_group_->all_reduce_sum(e * e);
  }
  return std::sqrt(squared);
}

void DataParallel::scale_grads(double factor) {
  opt_->scale_grads(factor);
  if (experts_) experts_->scale_grads(factor);
}

void DataParallel::step(double lr) {
  if (experts_) experts_->step(lr);
  opt_->step(lr);
  if (!opt_->sharding().shard_state || opt_->sharding().shard_params) return;  // zero3 gathers on the next use
  torch::NoGradGuard no_grad;
  std::vector<PendingWork> works;
  std::vector<torch::Tensor> inputs;
  FlatParams& flat = opt_->params();
  for (auto& g : flat.groups())
    for (const auto& pc : flat.pieces(g)) {
      inputs.push_back(g.params.narrow(0, pc.offset, pc.numel).clone());  // all_gather input must not alias output
      works.push_back(group_->all_gather(g.params.narrow(0, pc.bucket->offset, pc.bucket->numel), inputs.back()));
    }
  const auto t0 = std::chrono::steady_clock::now();
  for (auto& w : works) w.wait();
  comm_wait_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double DataParallel::predicted_state_bytes() const {
  const double P = static_cast<double>(opt_->num_params());
  const double n = opt_->sharding().shard_state ? group_->size() : 1;
  const double own = 8 * P / n * (opt_->sharding().offload ? 1.5 : 1.0);  // offload adds the 4P/N master copy
  return own + (experts_ ? experts_->predicted_state_bytes() : 0);
}

double DataParallel::predicted_grad_bytes() const {
  const double P = static_cast<double>(opt_->num_params());
  return 4 * P / (opt_->sharding().whole_grads ? 1 : group_->size()) + (experts_ ? experts_->predicted_grad_bytes() : 0);
}

int64_t DataParallel::max_bucket_bytes() const {
  if (units_) return units_->largest_unit_bytes();
  int64_t m = 0;
  for (const auto& b : buckets_) m = std::max(m, b->bucket->numel * 4);
  return m;
}

int64_t DataParallel::param_bytes() const {
  int64_t n = 0;
  for (const auto& g : opt_->groups()) n += g.params.numel() * 4;
  if (frozen_)
    for (const auto& g : frozen_->groups()) n += g.params.numel() * g.params.element_size();
  return n + (experts_ ? experts_->param_bytes() : 0);
}

double DataParallel::take_comm_wait_seconds() {
  const double s = comm_wait_s_ + (experts_ ? experts_->take_comm_wait_seconds() : 0) +
                   (units_ ? units_->take_comm_wait_seconds() : 0);
  comm_wait_s_ = 0;
  return s;
}

}  // namespace dsopen::train
