// Validation loss (docs/CONFIG.md §5.7): the first `steps` x `micro_batch` samples of the validation data, one pass
// at most, so every evaluation of a run — on any number of ranks — sees the same samples. Each rank evaluates its
// part; the summed cross-entropy over the summed target count is the same on every rank.
#pragma once

#include <torch/torch.h>

#include "data/batch_source.h"
#include "model/transformer.h"
#include "train/precision.h"
#include "train/process_group.h"

namespace dsopen::train {

class Evaluator {
public:
  Evaluator(model::CausalLM model, data::BatchSource& source, const Precision& precision, ProcessGroup& group,
            torch::Device device, int64_t micro_batch, int64_t steps);
  // Cross-entropy per target token of the validation data; -1 when it has no targets. Leaves the model training.
  double run();

private:
  model::CausalLM model_;
  data::BatchSource& source_;
  const Precision& precision_;
  ProcessGroup& group_;
  torch::Device device_;
  int64_t micro_batch_, steps_;
};

}  // namespace dsopen::train
