// KV-cache slots for continuous batching: one cache of `slots` rows × `capacity` positions (the model's own layout:
// K/V per head, or MLA's latent + rope key), each row holding one running sequence. A sequence takes the lowest
// free row, so running rows stay packed at the front and a decode step covers rows [0, rows_in_use()); a finished
// sequence frees its row at once. The number of rows comes from a byte budget (--kv-cache-mb).
#pragma once

#include <cstdint>
#include <vector>

#include "model/transformer.h"

namespace dsopen::serve {

class KVSlots {
public:
  // `capacity`: positions per row (prompt + generated tokens of one sequence); dtype: the model's float type.
  KVSlots(const model::CausalLM& model, int64_t slots, int64_t capacity, torch::Dtype dtype);

  // Bytes one row takes (all layers), for sizing a budget before allocating: MHA 2 × kv_heads × head_dim per layer
  // and position, MLA kv_lora_rank + qk_rope_head_dim.
  static int64_t bytes_per_row(const model::ModelConfig& c, int64_t capacity, torch::Dtype dtype);

  int64_t slots() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t capacity() const { return capacity_; }
  int64_t free_slots() const;
  // The lowest free row (its length reset to 0), or -1 when every row is taken.
  int64_t acquire();
  void release(int64_t row);
  // One past the highest row in use (0 when none): the rows a decode step covers.
  int64_t rows_in_use() const;
  // Positions filled in `row`; after a forward the caller advances it.
  int64_t& length(int64_t row) { return lengths_[row]; }
  // Positions filled over all rows in use (the KV-cache use a metric reports).
  int64_t used_positions() const;

  // A batch-1 cache over `row` whose length is the row's: a chunked prefill appends to it in place.
  model::KVCache row_view(int64_t row);
  // A cache over rows [0, n) for a per-row decode step (ForwardInput::row_lengths).
  model::KVCache rows_view(int64_t n);

private:
  model::KVCache cache_;
  int64_t capacity_;
  std::vector<int64_t> lengths_;
  std::vector<bool> used_;
};

}  // namespace dsopen::serve
