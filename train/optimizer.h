// AdamW (Loshchilov & Hutter 2019, decoupled weight decay) over the flat parameter buffers of train/flat_params.h:
// one vectorized update per group and owned piece. With sharded state (ZeRO-1/2) the moments exist only for this
// rank's slices; with offload they, a master copy of the owned values and the update live in host memory.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "train/flat_params.h"
#include "utils/progress.h"

namespace dsopen::train {

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
  bool decay_embeddings = false;
};

class FlatAdamW {
public:
  // Lays the trainable parameters out flat (train/flat_params.h) and allocates the moments of the owned part.
  FlatAdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, const AdamWOptions& options,
            const ShardingOptions& sharding = {});

  // The layout the collectives work on.
  FlatParams& params() { return *params_; }
  const FlatParams& params() const { return *params_; }
  const std::vector<FlatGroup>& groups() const { return params_->groups(); }
  std::vector<FlatGroup>& groups() { return params_->groups(); }
  std::vector<FlatPiece> pieces(const FlatGroup& g) const { return params_->pieces(g); }
  std::vector<FlatRange> owned_ranges(const FlatGroup& g) const { return params_->owned_ranges(g); }
  const ShardingOptions& sharding() const { return params_->sharding(); }

  void zero_grad() { params_->zero_grad(); }
  double grad_norm() const { return params_->grad_norm(); }
  void scale_grads(double factor) { params_->scale_grads(factor); }
  // Updates the owned slices of the parameters. With shard_state the other slices must then be all-gathered.
  void step(double lr);

  int64_t step_count() const { return step_; }
  int64_t num_params() const { return params_->num_params(); }
  int64_t state_bytes() const;  // Adam moments (+ the offloaded master copy) held by this rank
  int64_t grad_bytes() const { return params_->grad_bytes(); }

  // Moments, step count and the unpadded ranges they cover, keyed for a safetensors file, plus metadata (the
  // parameter list) that lets any world size re-slice them.
  std::map<std::string, torch::Tensor> state_dict() const;
  std::map<std::string, std::string> state_metadata() const;
  // Fills this rank's moments from the shards of any number of ranks (one entry per file), matching values by
  // parameter name: any world size, bucket size or expert-parallel layout re-slices. Throws a runtime error naming
  // the file when a parameter here is not saved (or saved with another size), when a file holds a parameter not
  // here that `foreign` does not accept (null: none; expert parallelism: other ranks' experts), or on a gap in the
  // coverage.
  struct SavedShard {
    std::string source;
    std::map<std::string, torch::Tensor> tensors;
    std::map<std::string, std::string> metadata;
  };
  void load_state_dicts(const std::vector<SavedShard>& shards,
                        const std::function<bool(const std::string&)>& foreign = nullptr);

private:
  struct Moments {
    torch::Tensor m, v;  // the owned part of the group (everything without shard_state)
  };
  struct SavedLayout;
  std::vector<SavedLayout> read_layouts(const std::vector<SavedShard>& shards,
                                        const std::function<bool(const std::string&)>& foreign) const;
  void load_moments(const FlatGroup& g, Moments& mo, const std::vector<SavedShard>& shards,
                    const std::vector<SavedLayout>& layouts, dsopen::Progress& progress);

  AdamWOptions opts_;
  std::unique_ptr<FlatParams> params_;
  std::vector<Moments> moments_;  // one per group
  int64_t step_ = 0;
};

}  // namespace dsopen::train
