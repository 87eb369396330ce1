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
  // Starts an optimizer step that takes `samples` of this rank's samples (micro_batch_size x grad_accum_steps):
  // when the epoch has fewer left, the step starts the next epoch. Rank r's k-th sample of an epoch is sample
  // k * world + r of its order, so a step covers the same samples whatever the split of the global batch into
  // ranks, accumulation and micro-batches — as long as epochs end at step boundaries, which this makes them do.
  void begin_step(DataCursor& cursor, int64_t samples) const {
    if (samples <= samples_per_rank() && cursor.position + samples > samples_per_rank()) cursor = {cursor.epoch + 1, 0};
  }
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
