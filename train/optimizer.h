// AdamW over flat buffers.
//
// Every trainable parameter of a group (decay / no decay) is re-pointed into one contiguous fp32 buffer, so an
// optimizer step is a handful of vectorized ops per group instead of a loop over hundreds of tensors (what
// PyTorch's fused/foreach AdamW buys), and data parallelism reduces or shards the flat buffers directly.
// No decay on 1-D parameters (norms, biases) or, unless asked, on embeddings.
//
// Layout for data parallelism (DESIGN §6): parameters are laid in reverse registration order (the order backward
// produces their gradients) and cut into buckets of about `bucket_numel` values at parameter boundaries; each
// bucket is padded to a multiple of the world size, so rank r of N owns slice r of every bucket. With
// `shard_state` the Adam moments exist only for the owned slices (ZeRO-1/2); without, for everything (DDP).
// Gradients are either one whole flat buffer the parameters' .grad views point into, or (ZeRO-2) only the owned
// slices — the data-parallel strategy then fills them by reduce-scatter.
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

struct ShardingOptions {
  int rank = 0, world_size = 1;
  bool shard_state = false;   // moments only for this rank's slices (zero1, zero2)
  bool whole_grads = true;    // false: gradients only for this rank's slices (zero2)
  int64_t bucket_numel = 0;   // 0: one bucket per group
  bool offload = false;       // moments and a master copy of the owned parameters in (pinned) host memory
};

class FlatAdamW {
public:
  FlatAdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, const AdamWOptions& options,
            const ShardingOptions& sharding = {});

  void zero_grad();
  // L2 norm of the gradients this rank holds: all of them with whole_grads, else its slices.
  double grad_norm() const;
  void scale_grads(double factor);
  // Updates the owned slices of the parameters. With shard_state the other slices must then be all-gathered.
  void step(double lr);

  int64_t step_count() const { return step_; }
  int64_t num_params() const;       // trainable, without padding
  int64_t state_bytes() const;      // Adam moments (+ the offloaded master copy) held by this rank
  int64_t grad_bytes() const;       // gradient buffers held by this rank
  const ShardingOptions& sharding() const { return sharding_; }

  struct Bucket {
    int64_t offset = 0, numel = 0;                    // padded range in the group buffer (numel % world == 0)
    int64_t unpadded_offset = 0, unpadded_numel = 0;  // the parameters' values in the unpadded concatenation
    int64_t shard_offset = 0;                         // where this rank's slice sits in the shard buffers
    std::vector<size_t> params;                       // indices into Group::names
  };
  struct Group {
    std::string name;
    bool decay;
    torch::Tensor params;       // flat padded fp32; the parameters alias into it
    torch::Tensor grads;        // whole_grads: flat padded, the parameters' .grad are views of it
    torch::Tensor shard_grads;  // !whole_grads: the owned slices, bucket after bucket
    torch::Tensor m, v;         // the owned part (everything without shard_state)
    torch::Tensor master;       // offload: host copy of the owned parameter values
    std::vector<std::string> names;
    std::vector<int64_t> offsets, numels;  // of each parameter in `params`
    std::vector<torch::Tensor> tensors;    // the parameters themselves
    std::vector<Bucket> buckets;
    int64_t numel = 0;  // unpadded
  };
  const std::vector<Group>& groups() const { return groups_; }
  std::vector<Group>& groups() { return groups_; }

  // This rank's pieces of a group: (padded offset in params, length, offset in m/v). One piece covering the whole
  // buffer without shard_state, else one per bucket.
  struct Piece {
    int64_t offset, numel, state_offset;
    const Bucket* bucket;
  };
  std::vector<Piece> pieces(const Group& g) const;

  // Moments, step count and the unpadded ranges they cover, keyed for a safetensors file, plus metadata (the
  // parameter list) that lets any world size re-slice them.
  std::map<std::string, torch::Tensor> state_dict() const;
  std::map<std::string, std::string> state_metadata() const;
  // Fills this rank's moments from the shards of any number of ranks (one entry per file). Throws a runtime error
  // naming the file on a different parameter layout or a gap in the coverage.
  struct SavedShard {
    std::string source;
    std::map<std::string, torch::Tensor> tensors;
    std::map<std::string, std::string> metadata;
  };
  void load_state_dicts(const std::vector<SavedShard>& shards);
  // The (offset in m/v, offset in the unpadded concatenation, length) ranges of real values this rank owns.
  struct Range {
    int64_t state_offset, unpadded_offset, numel;
  };
  std::vector<Range> owned_ranges(const Group& g) const;

private:
  AdamWOptions opts_;
  ShardingOptions sharding_;
  std::vector<Group> groups_;
  int64_t step_ = 0;
};

}  // namespace dsopen::train
