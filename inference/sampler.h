// Next-token sampling: greedy, temperature, top-k, top-p (nucleus), repetition penalty; seeded, so the same seed
// gives the same text.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <random>
#include <vector>

namespace dsopen::inference {

struct SamplingOptions {
  double temperature = 1.0;         // 0: greedy
  int64_t top_k = 0;                // 0: off
  double top_p = 1.0;               // 1: off
  double repetition_penalty = 1.0;  // 1: off; >1 discourages tokens already in the context (CTRL rule)
  uint64_t seed = 0;
  // OpenAI's penalties over the *generated* tokens (context from `generated_from` on), subtracted from the logits:
  // frequency_penalty × times the token occurred + presence_penalty × (it occurred at all). 0: off; [-2, 2].
  double frequency_penalty = 0.0, presence_penalty = 0.0;
  // vLLM's min_p: after temperature, drop tokens less likely than min_p times the most likely one. 0: off.
  double min_p = 0.0;
};

class Sampler {
public:
  explicit Sampler(const SamplingOptions& options);
  // logits: [V] for one position; `context` are the tokens so far (prompt + generated), the generated ones from
  // index `generated_from` (what the frequency and presence penalties count).
  int64_t sample(const torch::Tensor& logits, const std::vector<int32_t>& context, size_t generated_from = 0);
  // The tokens sampling may pick from after penalties, top-k and top-p (for tests), with their probabilities.
  std::vector<std::pair<int64_t, double>> candidates(const torch::Tensor& logits, const std::vector<int32_t>& context,
                                                     size_t generated_from = 0) const;

private:
  SamplingOptions opts_;
  std::mt19937_64 rng_;
};

}  // namespace dsopen::inference
