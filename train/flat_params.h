// The flat layout of the trainable parameters, shared by the optimizer's math (train/optimizer.h) and the
// collectives of data parallelism (train/data_parallel.h); see docs/ARCHITECTURE.md, "Data parallelism".
//
// Every trainable parameter of a group (decay / no decay) is re-pointed into one contiguous fp32 buffer, so an
// optimizer step is a handful of vectorized ops per group instead of a loop over hundreds of tensors (what
// PyTorch's fused/foreach AdamW buys), and collectives reduce or shard the flat buffers directly.
// No decay on 1-D parameters (norms, biases) or, unless asked, on embeddings.
//
// Parameters are laid in reverse registration order (the order backward produces their gradients) and cut into
// buckets of about `bucket_numel` values at parameter boundaries; each bucket is padded to a multiple of the
// world size, so rank r of N owns slice r of every bucket. Gradients are either one whole flat buffer the
// parameters' .grad views point into, or (ZeRO-2) only the owned slices, which the collectives fill.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace dsopen::train {

struct ShardingOptions {
  int rank = 0, world_size = 1;
  bool shard_state = false;   // optimizer state only for this rank's slices (zero1, zero2, zero3)
  bool whole_grads = true;    // false: gradients only for this rank's slices (zero2, zero3)
  // ZeRO-3: the parameter values too only for this rank's slices (`params` then holds them bucket after bucket,
  // like shard_grads), and the parameters are left to train/sharded_units.h to gather.
  bool shard_params = false;
  int64_t bucket_numel = 0;   // 0: one bucket per group
  // Set: one bucket per unit instead (a new bucket wherever the unit of the next parameter differs; ZeRO-3's
  // gather granularity); returns -1 for a parameter outside every unit (an error).
  std::function<int64_t(const std::string&)> unit_of;
  // With unit_of: whether a parameter may be gathered in the compute dtype (a projection's weight, which autocast
  // casts anyway) rather than fp32 (embeddings, norms, the router). Buckets are cut where it changes too.
  std::function<bool(const std::string&)> low_precision;
  bool offload = false;       // a master copy of the owned parameter values in (pinned) host memory
  // ZeRO-3 of a LoRA run: lay out the parameters that do NOT require grad (the frozen base) instead, one group per
  // dtype (float32 and the base's), in that dtype, without gradients (shard_params must be set).
  bool frozen = false;
  std::optional<torch::Device> device;  // where the flat buffers live (default: the parameters' device)
};

struct FlatBucket {
  int64_t offset = 0, numel = 0;                    // padded range in the group buffer (numel % world == 0)
  int64_t unpadded_offset = 0, unpadded_numel = 0;  // the parameters' values in the unpadded concatenation
  int64_t shard_offset = 0;                         // where this rank's slice sits in the shard buffers
  int64_t unit = -1;                                // ShardingOptions::unit_of of its parameters
  bool low_precision = false;                       // ShardingOptions::low_precision of its parameters
  std::vector<size_t> params;                       // indices into FlatGroup::names
};

struct FlatGroup {
  std::string name;
  bool decay;
  torch::Tensor params;       // flat padded fp32; the parameters alias into it (shard_params: the owned slices)
  torch::Tensor grads;        // whole_grads: flat padded, the parameters' .grad are views of it
  torch::Tensor shard_grads;  // !whole_grads: the owned slices, bucket after bucket
  torch::Tensor master;       // offload: host copy of the owned parameter values (the optimizer updates it)
  std::vector<std::string> names;
  std::vector<int64_t> offsets, numels;  // of each parameter in `params`
  std::vector<torch::Tensor> tensors;    // the parameters themselves
  std::vector<FlatBucket> buckets;
  int64_t numel = 0;  // unpadded
};

// A rank's piece of a group: (padded offset in params, length, offset in the owned/state buffers). One piece
// covering the whole buffer without shard_state, else one per bucket.
struct FlatPiece {
  int64_t offset, numel, state_offset;
  const FlatBucket* bucket;
};

// The (offset in the owned buffers, offset in the unpadded concatenation, length) ranges of real values a rank
// owns: what its checkpoint slice covers, independent of padding and bucket sizes.
struct FlatRange {
  int64_t state_offset, unpadded_offset, numel;
};

class FlatParams {
public:
  // Moves every parameter that requires grad into the flat buffers (their .data now alias them).
  FlatParams(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, bool decay_embeddings,
             const ShardingOptions& sharding);

  const std::vector<FlatGroup>& groups() const { return groups_; }
  std::vector<FlatGroup>& groups() { return groups_; }
  const ShardingOptions& sharding() const { return sharding_; }
  std::vector<FlatPiece> pieces(const FlatGroup& g) const;
  std::vector<FlatRange> owned_ranges(const FlatGroup& g) const;
  // Elements of the buffers this rank's state covers (its slices with shard_state, else everything, padded).
  int64_t owned_numel(const FlatGroup& g) const;

  void zero_grad();
  // The gradient this rank holds for `piece` (the whole buffer's part, or its owned slice).
  torch::Tensor grad(const FlatGroup& g, const FlatPiece& piece) const;
  // L2 norm of the gradients this rank holds (all with whole_grads, else its slices), accurate to ~1e-9
  // relative whatever the buffer's size and slicing.
  double grad_norm() const;
  void scale_grads(double factor);
  // Copies the owned parameter values into the offload master copy.
  void refresh_master();

  int64_t num_params() const;   // trainable, without padding
  int64_t grad_bytes() const;   // gradient buffers held by this rank
  int64_t master_bytes() const;

private:
  ShardingOptions sharding_;
  std::vector<FlatGroup> groups_;
};

}  // namespace dsopen::train
