// Text generation with the KV cache: one prefill pass over the prompt, then one cached decode step per token
// (MLA layers cache only their latent and rope key). Stops at EOS, a stop string or the token limit.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "inference/sampler.h"
#include "model/transformer.h"

namespace dsopen::inference {

struct GenerateOptions {
  int64_t max_new_tokens = 128;
  std::vector<std::string> stop;  // stop strings in the generated text (the text up to them is kept)
  bool stop_at_eos = true;
  std::vector<int32_t> eos_ids;   // any of them ends a sequence (not part of its tokens); empty: the tokenizer's EOS
  int64_t max_length = 0;         // > 0: a sequence also ends when prompt + generated reaches it (transformers' max_length)
  bool decode_text = true;  // false: token ids only (no text, no stop strings, no streaming), e.g. for benchmarks
  // On the CPU, decode with fewer threads while other processes keep the CPUs busy (cpu::ThreadBackoff). The tools
  // set it when the user left the thread count to them; off, the thread count never changes (reproducible sums).
  bool adapt_threads = false;
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // generated tokens (an ending EOS excluded)
  std::string text;             // decode(prompt + tokens) - decode(prompt), cut at a stop string
  int64_t prompt_tokens = 0;
  double prefill_s = 0, decode_s = 0;  // the whole batch's: prompt forward (+ cache allocation), then the token loop
  int64_t decode_forwards = 0;         // one-token forward passes in decode_s (new tokens - 1 without an early stop)
};

// Generates for several prompts of different lengths at once: they are left-padded, padding is masked out of
// attention and each sequence keeps its own positions, so every result equals generating that prompt alone
// (greedy; a sampler draws from one generator, so sampled text depends on the batch). `on_text(i, piece)` streams:
// the pieces of sequence i add up to its result's text.
std::vector<GenerateResult> generate_batch(model::CausalLM& model, const data::Tokenizer& tok,
                                           const std::vector<std::vector<int32_t>>& prompts, Sampler& sampler,
                                           const GenerateOptions& options,
                                           const std::function<void(size_t, const std::string&)>& on_text = nullptr);

// Generates after `prompt` (token ids); `on_text` receives each new piece of decoded text as it is produced.
// A prompt that does not fit the model's context (with room for one token) is a usage error.
GenerateResult generate(model::CausalLM& model, const data::Tokenizer& tok, const std::vector<int32_t>& prompt,
                        Sampler& sampler, const GenerateOptions& options,
                        const std::function<void(const std::string&)>& on_text = nullptr);

}  // namespace dsopen::inference
