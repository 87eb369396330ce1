// TokenDataset: packed pretraining samples over memory-mapped token shards.
//
// The shards are one logical token stream; sample i is tokens [i*T, i*T + T + 1) — T inputs and the T next-token
// targets — so samples run across document boundaries (documents are separated by EOS). Each epoch visits the
// samples in a permutation derived from (seed, epoch); rank r of N takes permutation entries r, r+N, r+2N, ...
// (the tail that does not divide evenly is dropped), so ranks never share a sample and together cover the epoch.
// A DataCursor (epoch, position) is all a checkpoint needs to resume with exactly the next batch.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "data/batch.h"
#include "data/shards.h"

namespace dsopen::data {

struct DataCursor {
  int64_t epoch = 0;
  int64_t position = 0;  // samples this rank has consumed in the epoch
};

struct TokenDatasetOptions {
  std::vector<std::string> shards;  // paths, prefixes or globs
  int64_t seq_len = 256;
  uint64_t seed = 1234;
  int rank = 0, world_size = 1;
  double valid_fraction = 0.0;      // the last fraction of the samples is held out for validation
  std::string tokenizer_hash;       // when set, every shard must carry it
  std::string tokenizer_of = "run's tokenizer";  // whose tokenizer that is, for errors
  int64_t model_vocab_size = 0;     // when set, shard vocabularies must fit in it
  // How errors name `shards` and `seq_len` to the user: config keys, or a tool's flags (--calib-data, --seq-len).
  std::string shards_name = "data.train", seq_len_name = "data.seq_len";
};

enum class Split { Train, Valid, All };

class TokenDataset {
public:
  TokenDataset(const TokenDatasetOptions& options, Split split);

  int64_t num_samples() const { return end_ - begin_; }    // in this split, all ranks
  int64_t samples_per_rank() const { return num_samples() / opts_.world_size; }
  int64_t total_tokens() const { return total_tokens_; }
  int64_t seq_len() const { return opts_.seq_len; }

  // The next micro batch of this rank; advances the cursor, moving to the next epoch when fewer than
  // `micro_batch` samples are left in this one.
  Batch next(DataCursor& cursor, int64_t micro_batch) const;
  // This rank's sample ids (global, within the split) for an epoch, in visiting order.
  std::vector<int64_t> rank_order(int64_t epoch) const;
  // The seq_len + 1 tokens of a sample (global id within the split).
  std::vector<int64_t> sample_tokens(int64_t sample) const;
  Batch make_batch(const std::vector<int64_t>& samples) const;

private:
  void read(int64_t offset, int64_t n, int64_t* out) const;

  TokenDatasetOptions opts_;
  std::vector<std::unique_ptr<MappedShard>> shards_;
  std::vector<int64_t> starts_;  // global offset of each shard
  int64_t total_tokens_ = 0;
  int64_t begin_ = 0, end_ = 0;  // sample range of the split
  mutable int64_t cached_epoch_ = -1;  // rank_order of the epoch in progress, so next() does not reshuffle
  mutable std::vector<int64_t> cached_order_;
};

}  // namespace dsopen::data
