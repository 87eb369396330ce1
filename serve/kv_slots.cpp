#include "serve/kv_slots.h"

#include <algorithm>

namespace dsopen::serve {

KVSlots::KVSlots(const model::CausalLM& model, int64_t slots, int64_t capacity, torch::Dtype dtype)
    : cache_(model->make_cache(slots, capacity, dtype)), capacity_(capacity), lengths_(slots, 0), used_(slots, false) {}

int64_t KVSlots::bytes_per_row(const model::ModelConfig& c, int64_t capacity, torch::Dtype dtype) {
  const int64_t per_position = c.is_mla() ? c.kv_lora_rank + c.qk_rope_head_dim
                                          : 2 * c.num_key_value_heads * c.attn_head_dim();
  return per_position * c.num_hidden_layers * capacity * static_cast<int64_t>(torch::elementSize(dtype));
}

int64_t KVSlots::free_slots() const { return std::count(used_.begin(), used_.end(), false); }

int64_t KVSlots::acquire() {
  for (size_t r = 0; r < used_.size(); ++r)
    if (!used_[r]) {
      used_[r] = true;
      lengths_[r] = 0;
      return static_cast<int64_t>(r);
    }
  return -1;
}

void KVSlots::release(int64_t row) {
  used_[row] = false;
  lengths_[row] = 0;
}

int64_t KVSlots::rows_in_use() const {
  for (int64_t r = slots(); r > 0; --r)
    if (used_[r - 1]) return r;
  return 0;
}

int64_t KVSlots::used_positions() const {
  int64_t n = 0;
  for (size_t r = 0; r < used_.size(); ++r)
    if (used_[r]) n += lengths_[r];
  return n;
}

model::KVCache KVSlots::row_view(int64_t row) {
  model::KVCache view;
  view.capacity = capacity_;
  view.length = lengths_[row];
  for (const auto& l : cache_.layers) view.layers.push_back({l.a.narrow(0, row, 1), l.b.narrow(0, row, 1)});
  return view;
}

model::KVCache KVSlots::rows_view(int64_t n) {
  model::KVCache view;
  view.capacity = capacity_;
  for (const auto& l : cache_.layers) view.layers.push_back({l.a.narrow(0, 0, n), l.b.narrow(0, 0, n)});
  return view;
}

}  // namespace dsopen::serve
