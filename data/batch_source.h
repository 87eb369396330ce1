// The batches a run trains and evaluates on, one interface over both data formats: packed pretraining samples
// over token shards (data/dataset.h) and SFT conversations (data/sft.h). A DataCursor (epoch, position) is all a
// checkpoint needs to resume with exactly the next batch.
#pragma once

#include <cstdint>
#include <memory>

#include "data/batch.h"
#include "data/dataset.h"
#include "data/options.h"
#include "data/tokenizer.h"

namespace dsopen::data {

class BatchSource {
public:
  virtual ~BatchSource() = default;
  // This rank's next micro batch of `micro_batch` rows (int64 tensors on the CPU); advances `cursor`, into the next
  // epoch when this one has too few samples left.
  virtual Batch next(DataCursor& cursor, int64_t micro_batch) = 0;
  virtual int64_t samples_per_rank() const = 0;  // per epoch
};

struct BatchSources {
  std::unique_ptr<BatchSource> train;
  std::unique_ptr<BatchSource> valid;  // null when the config holds out nothing
};

// The sources of a `data:` section for rank `rank` of `world`: pretraining shards (with data.valid, or the last
// data.valid_fraction of the samples held out) or SFT JSONL files rendered with the chat template. Shards must
// carry `tok`'s hash and fit `model_vocab_size`; errors name the file.
BatchSources make_batch_sources(const DataOptions& options, const Tokenizer& tok, int64_t model_vocab_size,
                                uint64_t seed, int rank, int world);

}  // namespace dsopen::data
