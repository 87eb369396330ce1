// Evaluating a model outside training: the logits of given token sequences, and perplexity over token shards.
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

#include "model/transformer.h"

namespace dsopen::inference {

// One sequence of whitespace-separated ids per line, every line the same length -> [N, T] int64. Runtime errors
// name file:line (an id outside [0, vocab), a ragged line).
torch::Tensor read_token_file(const std::string& path, int64_t vocab);

struct Perplexity {
  double tokens = 0;  // target tokens scored
  double loss = 0;    // mean cross-entropy per target token
  double ppl = 0;     // exp(loss)
};
// Over the shards' samples of `seq_len` tokens (in order, batches of 8; `max_batches` 0: all). A runtime error when
// the shards hold fewer than 8 such samples, or (`tokenizer_hash` set: the model's tokenizer) were made by another
// tokenizer.
Perplexity perplexity(model::CausalLM& model, const std::vector<std::string>& shards, int64_t seq_len,
                      int64_t max_batches, const std::string& tokenizer_hash = "");

// The hash shards carry of the tokenizer in (or named by) a model directory; "" when it has none.
std::string model_tokenizer_hash(const std::string& model_dir);

}  // namespace dsopen::inference
