#include "data/batch_source.h"

#include "data/sft.h"
#include "utils/errors.h"

namespace dsopen::data {

namespace {

class ShardSource : public BatchSource {
public:
  explicit ShardSource(std::unique_ptr<TokenDataset> ds) : ds_(std::move(ds)) {}
  Batch next(DataCursor& c, int64_t b) override { return ds_->next(c, b); }
  int64_t samples_per_rank() const override { return ds_->samples_per_rank(); }

private:
  std::unique_ptr<TokenDataset> ds_;
};

class SftSource : public BatchSource {
public:
  explicit SftSource(std::unique_ptr<SftDataset> ds) : ds_(std::move(ds)) {}
  Batch next(DataCursor& c, int64_t b) override {
    const int64_t per_epoch = ds_->batches_per_epoch(b);
    if (per_epoch < 1)
      throw usage_error("train.micro_batch_size",
                        std::to_string(b) + " is larger than the " + std::to_string(ds_->samples_per_rank()) +
                            " SFT samples each rank has per epoch (" + std::to_string(ds_->dropped()) +
                            " conversations dropped: too long or nothing to train on)",
                        "lower train.micro_batch_size or add conversations");
    if (c.position / b >= per_epoch) c = {c.epoch + 1, 0};
    auto batch = ds_->batch(c.epoch, c.position / b, b);
    c.position += b;
    return batch;
  }
  int64_t samples_per_rank() const override { return ds_->samples_per_rank(); }

private:
  std::unique_ptr<SftDataset> ds_;
};

BatchSources pretraining_sources(const DataOptions& d, const Tokenizer& tok, int64_t vocab, uint64_t seed, int rank,
                                 int world) {
  TokenDatasetOptions o;
  o.shards = d.train;
  o.seq_len = d.seq_len;
  o.seed = seed;
  o.rank = rank;
  o.world_size = world;
  o.valid_fraction = d.valid.empty() ? d.valid_fraction : 0.0;
  o.tokenizer_hash = tok.hash();
  o.model_vocab_size = vocab;
  BatchSources s;
  s.train = std::make_unique<ShardSource>(std::make_unique<TokenDataset>(o, Split::Train));
  if (!d.valid.empty()) {
    o.shards = d.valid;
    s.valid = std::make_unique<ShardSource>(std::make_unique<TokenDataset>(o, Split::All));
  } else if (d.valid_fraction > 0) {
    s.valid = std::make_unique<ShardSource>(std::make_unique<TokenDataset>(o, Split::Valid));
  }
  return s;
}

std::unique_ptr<BatchSource> sft_source(const std::string& key, const std::vector<std::string>& files,
                                        const DataOptions& d, const Tokenizer& tok, uint64_t seed, int rank, int world) {
  std::vector<Conversation> convs;
  std::string names;
  for (const auto& f : files) {
    auto part = read_sft_jsonl(f);
    convs.insert(convs.end(), part.begin(), part.end());
    names += (names.empty() ? "" : ", ") + f;
  }
  return std::make_unique<SftSource>(std::make_unique<SftDataset>(convs, tok, d.chat_template, d.seq_len, d.truncation,
                                                                  d.pack, seed, rank, world, key + " (" + names + ")"));
}

}  // namespace

BatchSources make_batch_sources(const DataOptions& options, const Tokenizer& tok, int64_t model_vocab_size,
                                uint64_t seed, int rank, int world) {
  if (options.format == DataOptions::Format::Pretrain)
    return pretraining_sources(options, tok, model_vocab_size, seed, rank, world);
  BatchSources s;
  s.train = sft_source("data.train", options.train, options, tok, seed, rank, world);
  if (!options.valid.empty()) s.valid = sft_source("data.valid", options.valid, options, tok, seed, rank, world);
  return s;
}

}  // namespace dsopen::data
