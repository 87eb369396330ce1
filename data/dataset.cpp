#include "data/dataset.h"

#include <algorithm>
#include <numeric>
#include <random>

#include "utils/errors.h"

namespace dsopen::data {

TokenDataset::TokenDataset(const TokenDatasetOptions& o, Split split) : opts_(o) {
  if (o.seq_len < 1) throw usage_error(o.seq_len_name, "must be >= 1");
  if (o.world_size < 1 || o.rank < 0 || o.rank >= o.world_size) throw usage_error("rank", "bad rank/world size");
  std::vector<std::string> prefixes;
  for (const auto& pattern : o.shards) {
    auto found = expand_shards(pattern);
    if (found.empty()) throw runtime_error(pattern, "no shards match", "run dsopen-preprocess or fix " + o.shards_name);
    prefixes.insert(prefixes.end(), found.begin(), found.end());
  }
  if (prefixes.empty()) throw usage_error(o.shards_name, "no shards given");
  for (const auto& p : prefixes) {
    auto shard = std::make_unique<MappedShard>(p);
    const ShardHeader& h = shard->header();
    const ShardHeader& first = shards_.empty() ? h : shards_.front()->header();
    if (h.tokenizer_hash != first.tokenizer_hash)
      throw runtime_error(p, "shards from two different tokenizers (" + first.tokenizer_hash + " in " +
                                 shards_.front()->prefix() + ", " + h.tokenizer_hash + " here)",
                          "preprocess all data with one tokenizer");
    if (!o.tokenizer_hash.empty() && h.tokenizer_hash != o.tokenizer_hash)
      throw runtime_error(p, "shard tokenizer " + h.tokenizer_hash + " differs from the " + o.tokenizer_of + " " +
                                 o.tokenizer_hash,
                          "re-run dsopen-preprocess with that tokenizer");
    if (o.model_vocab_size > 0 && h.vocab_size > o.model_vocab_size)
      throw runtime_error(p, "shard vocabulary (" + std::to_string(h.vocab_size) + ") is larger than the model's vocab_size (" +
                                 std::to_string(o.model_vocab_size) + ")",
                          "set model.vocab_size to at least the tokenizer's vocabulary");
    starts_.push_back(total_tokens_);
    total_tokens_ += h.tokens;
    shards_.push_back(std::move(shard));
  }
  const int64_t samples = total_tokens_ > 0 ? (total_tokens_ - 1) / o.seq_len : 0;
  int64_t n_valid = 0;
  if (o.valid_fraction > 0) n_valid = std::max<int64_t>(1, static_cast<int64_t>(samples * o.valid_fraction));
  const int64_t n_train = samples - n_valid;
  if (split == Split::Train) begin_ = 0, end_ = n_train;
  else if (split == Split::Valid) begin_ = n_train, end_ = samples;
  else begin_ = 0, end_ = samples;
  if (end_ - begin_ < o.world_size)
    throw runtime_error(shards_.front()->prefix(),
                        "only " + std::to_string(end_ - begin_) + " samples of seq_len " + std::to_string(o.seq_len) +
                            " in " + std::to_string(total_tokens_) + " tokens for " + std::to_string(o.world_size) +
                            " rank(s)",
                        "lower " + o.seq_len_name + " or add data");
}

void TokenDataset::read(int64_t offset, int64_t n, int64_t* out) const {
  // The shard holding `offset`, then continue into the following ones.
  size_t s = std::upper_bound(starts_.begin(), starts_.end(), offset) - starts_.begin() - 1;
  while (n > 0) {
    const int64_t local = offset - starts_[s];
    const int64_t take = std::min(n, shards_[s]->size() - local);
    shards_[s]->read(local, take, out);
    out += take, offset += take, n -= take, ++s;
  }
}

std::vector<int64_t> TokenDataset::sample_tokens(int64_t sample) const {
  std::vector<int64_t> tokens(opts_.seq_len + 1);
  read((begin_ + sample) * opts_.seq_len, opts_.seq_len + 1, tokens.data());
  return tokens;
}

std::vector<int64_t> TokenDataset::rank_order(int64_t epoch) const {
  std::vector<int64_t> perm(num_samples());
  std::iota(perm.begin(), perm.end(), 0);
  // One generator per epoch: any epoch's order can be rebuilt from (seed, epoch) alone.
  std::mt19937_64 rng(opts_.seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(epoch) + 1);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int64_t> mine;
  mine.reserve(samples_per_rank());
  for (int64_t k = 0; k < samples_per_rank(); ++k) mine.push_back(perm[k * opts_.world_size + opts_.rank]);
  return mine;
}

Batch TokenDataset::make_batch(const std::vector<int64_t>& samples) const {
  const int64_t B = static_cast<int64_t>(samples.size()), T = opts_.seq_len;
  auto tokens = torch::empty({B, T + 1}, torch::kLong);  // [B, T + 1]
  for (int64_t b = 0; b < B; ++b) read((begin_ + samples[b]) * T, T + 1, tokens[b].data_ptr<int64_t>());
  Batch batch;
  batch.input_ids = tokens.narrow(1, 0, T).contiguous();
  batch.labels = tokens.narrow(1, 1, T).contiguous();
  return batch;
}

Batch TokenDataset::next(DataCursor& cursor, int64_t micro_batch) const {
  if (micro_batch > samples_per_rank())
    throw usage_error("train.micro_batch_size", "larger than the " + std::to_string(samples_per_rank()) +
                                                    " samples each rank has per epoch", "lower it or add data");
  if (cursor.position + micro_batch > samples_per_rank()) cursor = {cursor.epoch + 1, 0};
  if (cached_epoch_ != cursor.epoch) cached_order_ = rank_order(cursor.epoch), cached_epoch_ = cursor.epoch;
  std::vector<int64_t> picked(cached_order_.begin() + cursor.position,
                              cached_order_.begin() + cursor.position + micro_batch);
  cursor.position += micro_batch;
  return make_batch(picked);
}

}  // namespace dsopen::data
