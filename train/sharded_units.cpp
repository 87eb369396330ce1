#include "train/sharded_units.h"

#include <ATen/native/Resize.h>
#ifdef DSOPEN_WITH_CUDA
#include <ATen/native/cuda/Resize.h>
#endif

#include <chrono>

#include "utils/errors.h"

namespace dsopen::train {

namespace {

// Gives a tensor's storage `bytes` bytes (0 frees it). Views of the tensor keep their sizes and offsets and read
// the new allocation; nothing is copied when growing from zero.
void resize_storage(const torch::Tensor& t, size_t bytes) {
  c10::StorageImpl* storage = t.storage().unsafeGetStorageImpl();
  if (storage->nbytes() == bytes) return;
#ifdef DSOPEN_WITH_CUDA
  if (t.is_cuda()) return at::native::resize_bytes_cuda(storage, bytes);
#endif
  TORCH_CHECK(t.is_cpu(), "ZeRO-3 gathers parameters on CPU and CUDA devices only");
  at::native::resize_bytes_cpu(storage, bytes);
}

}  // namespace

struct ShardedUnits::Part {
  FlatGroup* group;
  const FlatBucket* bucket;
  bool trainable;       // false: a frozen base's (gathered in its own dtype, no gradients)
  torch::Tensor full;   // [bucket numel]; the parameters view it; zero bytes while freed
  torch::Tensor input;  // this rank's slice in full's dtype, while an all-gather reads it
  int64_t bytes() const { return full.numel() * full.element_size(); }
};

struct ShardedUnits::Unit {
  std::vector<Part> parts;
  bool resident = false;             // the buffers hold storage (gathered, or being gathered into)
  std::vector<PendingWork> gathers;  // in flight
  int64_t backward_uses = 0;         // hooked uses whose after_backward has not come yet
  bool needs_flush = false;          // used without a backward hook since the last reduction
};

struct ShardedUnits::Reduction {
  PendingWork work;
  torch::Tensor in, out;
  const Part* part;
};

ShardedUnits::ShardedUnits(const std::vector<FlatParams*>& layouts, ProcessGroup& group, int64_t units, int64_t layers,
                           torch::ScalarType compute_dtype)
    : group_(group), layers_(layers), dtype_(compute_dtype) {
  for (int64_t u = 0; u < units; ++u) units_.push_back(std::make_unique<Unit>());
  torch::NoGradGuard no_grad;
  for (FlatParams* flat : layouts) {
    if (!flat->sharding().shard_params) throw std::invalid_argument("ShardedUnits: the layout must shard the parameters");
    const bool trainable = !flat->sharding().frozen;
    for (auto& g : flat->groups())
      for (const auto& b : g.buckets) {
        if (b.unit < 0 || b.unit >= units) throw std::invalid_argument("ShardedUnits: a bucket outside the units");
        // Projection weights are gathered in the compute dtype (what autocast rounds them to anyway); the rest as
        // they are kept: embeddings, norms, the router and the head in fp32, a frozen base in its dtype.
        const auto dtype = trainable && b.low_precision ? dtype_ : g.params.scalar_type();
        Part part{&g, &b, trainable, torch::empty({b.numel}, g.params.options().dtype(dtype)), {}};
        for (const size_t k : b.params) {
          auto& p = g.tensors[k];
          p.set_data(part.full.narrow(0, g.offsets[k] - b.offset, g.numels[k]).view(p.sizes()));
        }
        resize_storage(part.full, 0);
        units_[b.unit]->parts.push_back(std::move(part));
      }
  }
}

ShardedUnits::~ShardedUnits() {
  // Collectives in flight must not outlive their buffers; a failed peer already threw, so errors end here.
  for (auto& r : reductions_) try {
      r->work.wait();
    } catch (...) {
    }
  for (auto& u : units_) try {
      wait(u->gathers);
    } catch (...) {
    }
}

double ShardedUnits::wait(std::vector<PendingWork>& works) {
  const auto t0 = std::chrono::steady_clock::now();
  for (auto& w : works) w.wait();
  works.clear();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  comm_wait_s_ += s;
  return s;
}

void ShardedUnits::gather(int64_t u, bool wait_now) {
  Unit& unit = *units_[u];
  if (!unit.resident) {
    torch::NoGradGuard no_grad;
    const int64_t N = group_.size();
    for (auto& part : unit.parts) {
      resize_storage(part.full, static_cast<size_t>(part.bytes()));
      const FlatBucket& b = *part.bucket;
      part.input = part.group->params.narrow(0, b.shard_offset, b.numel / N).to(part.full.scalar_type());
      unit.gathers.push_back(group_.all_gather(part.full, part.input));
      gathered_bytes_ += part.bytes();
    }
    peak_gathered_bytes_ = std::max(peak_gathered_bytes_, gathered_bytes_);
    unit.resident = true;
  }
  if (wait_now && !unit.gathers.empty()) {
    wait(unit.gathers);
    for (auto& part : unit.parts) part.input = torch::Tensor();
  }
}

void ShardedUnits::release(int64_t u) {
  Unit& unit = *units_[u];
  if (!unit.resident) return;
  wait(unit.gathers);  // a prefetch nobody used: its buffers are written until it completes
  for (auto& part : unit.parts) {
    part.input = torch::Tensor();
    resize_storage(part.full, 0);
    gathered_bytes_ -= part.bytes();
  }
  unit.resident = false;
}

void ShardedUnits::before_forward(int64_t u) {
  gather(u, true);
  // A decoder layer prefetches the next layer (the last one the final norm, which prefetches the head). The
  // embedding, the head and the MTP modules prefetch nothing: what follows them depends on the model.
  if (u >= 1 && u <= layers_ + 1 && u + 1 < units()) gather(u + 1, false);
}

void ShardedUnits::after_forward(int64_t u, bool backward_hooked) {
  if (torch::GradMode::is_enabled()) {
    if (backward_hooked) ++units_[u]->backward_uses;
    else units_[u]->needs_flush = true;
  }
  release(u);
}

void ShardedUnits::before_backward(int64_t u) {
  gather(u, true);
  // Backward walks the layers in reverse: the final norm and each layer but the first prefetch the layer before,
  // once every later unit (the head, the MTP modules) is done with its backward.
  if (u < 2 || u > layers_ + 1) return;
  for (int64_t later = u + 1; later < units(); ++later)
    if (units_[later]->backward_uses > 0) return;
  gather(u - 1, false);
}

void ShardedUnits::after_backward(int64_t u) {
  Unit& unit = *units_[u];
  reduce(u);
  // A unit used twice (the head: by the main output and by each MTP depth) stays until its last use is done.
  if (unit.backward_uses > 0) --unit.backward_uses;
  if (unit.backward_uses == 0) release(u);
}

void ShardedUnits::reduce(int64_t u) {
  torch::NoGradGuard no_grad;
  const int64_t N = group_.size();
  for (const auto& part : units_[u]->parts) {
    if (!part.trainable) continue;
    // Bound the gradient memory in flight: a few buckets at a time.
    while (reductions_.size() >= 4) complete_oldest_reduction();
    const FlatGroup& g = *part.group;
    const FlatBucket& b = *part.bucket;
    auto r = std::make_unique<Reduction>();
    r->part = &part;
    r->in = torch::zeros({b.numel}, g.params.options());  // fp32: gradients are summed over ranks in fp32
    for (const size_t k : b.params) {
      auto& p = g.tensors[k];
      if (!p.grad().defined()) continue;
      r->in.narrow(0, g.offsets[k] - b.offset, g.numels[k]).copy_(p.grad().reshape({-1}));
      p.mutable_grad().reset();
    }
    r->out = torch::empty({b.numel / N}, g.params.options());
    r->work = group_.reduce_scatter_sum(r->out, r->in);
    reduce_bytes_ += (r->in.numel() + r->out.numel()) * 4;
    peak_reduce_bytes_ = std::max(peak_reduce_bytes_, reduce_bytes_);
    reductions_.push_back(std::move(r));
  }
  units_[u]->needs_flush = false;
}

void ShardedUnits::complete_oldest_reduction() {
  auto r = std::move(reductions_.front());
  reductions_.erase(reductions_.begin());
  std::vector<PendingWork> works{std::move(r->work)};
  wait(works);
  const FlatBucket& b = *r->part->bucket;
  torch::NoGradGuard no_grad;
  r->part->group->shard_grads.narrow(0, b.shard_offset, r->out.numel()).add_(r->out);
  reduce_bytes_ -= (r->in.numel() + r->out.numel()) * 4;
}

void ShardedUnits::finish_micro_step() {
  // In unit order, so every rank issues the same collectives in the same order. Besides the units used without a
  // backward hook, a unit whose gradient arrived after its last after_backward (autograd runs a shared parameter's
  // accumulation once all its uses are done) is reduced now; every rank runs the same graph, so they agree.
  for (int64_t u = 0; u < units(); ++u) {
    bool late = false;
    for (const auto& part : units_[u]->parts)
      for (const size_t k : part.bucket->params) late = late || part.group->tensors[k].grad().defined();
    if (units_[u]->needs_flush || late) reduce(u);
  }
  for (int64_t u = 0; u < units(); ++u) {
    release(u);
    units_[u]->backward_uses = 0;
  }
  while (!reductions_.empty()) complete_oldest_reduction();
}

std::vector<std::pair<std::string, torch::Tensor>> ShardedUnits::gather_values(int64_t u, bool trainable_only) {
  torch::NoGradGuard no_grad;
  const int64_t N = group_.size();
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& part : units_[u]->parts) {
    if (trainable_only && !part.trainable) continue;
    const FlatGroup& g = *part.group;
    const FlatBucket& b = *part.bucket;
    auto whole = torch::empty({b.numel}, g.params.options());
    std::vector<PendingWork> works{group_.all_gather(whole, g.params.narrow(0, b.shard_offset, b.numel / N))};
    wait(works);
    for (const size_t k : b.params)
      out.push_back({g.names[k], whole.narrow(0, g.offsets[k] - b.offset, g.numels[k]).view(g.tensors[k].sizes())});
  }
  return out;
}

std::vector<ShardedUnits::Parameter> ShardedUnits::parameters(int64_t u) const {
  std::vector<Parameter> out;
  for (const auto& part : units_[u]->parts)
    for (const size_t k : part.bucket->params)
      out.push_back({part.group->names[k], part.group->tensors[k].sizes().vec(), part.group->params.scalar_type()});
  return out;
}

int64_t ShardedUnits::largest_unit_bytes() const {
  int64_t m = 0;
  for (const auto& u : units_) {
    int64_t bytes = 0;
    for (const auto& part : u->parts) bytes += part.bytes();
    m = std::max(m, bytes);
  }
  return m;
}

double ShardedUnits::take_comm_wait_seconds() {
  const double s = comm_wait_s_;
  comm_wait_s_ = 0;
  return s;
}

}  // namespace dsopen::train
