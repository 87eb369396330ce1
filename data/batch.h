// A training batch as every dataset yields it.
#pragma once

#include <torch/torch.h>

namespace dsopen::data {

struct Batch {
  torch::Tensor input_ids;  // [B, T] int64
  torch::Tensor labels;     // [B, T] int64, next-token targets; -100 where no loss is taken
  // Packed samples only (undefined otherwise): which document each position belongs to (1, 2, ...; 0 = padding)
  // and its position inside that document, so attention and RoPE restart at every document boundary.
  torch::Tensor segment_ids;   // [B, T] int64
  torch::Tensor position_ids;  // [B, T] int64
};

}  // namespace dsopen::data
