// Turning a user's request into generation inputs: prompt text or ids into token ids (with BOS, or in the chat
// template), and the sampling values and end-of-text ids from the model directory's generation_config.json
// (model/generation_config.h) with the user's explicit values on top. dsopen-generate and a server share these.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "data/chat_format.h"
#include "data/sft.h"
#include "data/tokenizer.h"
#include "inference/sampler.h"
#include "model/config.h"
#include "model/generation_config.h"

namespace dsopen::inference {

// "1,5,9" or "1 5 9" -> ids; a usage error naming --prompt-ids for anything else or an empty list.
std::vector<int32_t> parse_token_ids(const std::string& text);
// A usage error naming --prompt-ids when an id is outside the model's vocabulary.
void check_ids_fit(const std::vector<int32_t>& ids, int64_t vocab_size);
// A usage error naming the tokenizer when its vocabulary exceeds the model's.
void check_tokenizer_fits(const data::Tokenizer& tok, const model::ModelConfig& c, const std::string& where);

struct PromptOptions {
  bool bos = true;           // prepend the tokenizer's BOS (when it has one)
  bool chat = false;         // render as one user turn of the chat format, the assistant's turn opened
  std::string system;        // chat: an optional system message
  // chat: the model's format (data::ChatFormat::for_model); the SFT default unless set. `bos` applies to an SFT
  // template (a Jinja template writes its own BOS).
  data::ChatFormat format{data::ChatTemplate{}};
};
std::vector<int32_t> prompt_ids(const std::string& prompt, const data::Tokenizer& tok, const PromptOptions& o);

// The chat format to generate with: an adapter's run's SFT template (the conversations it was fine-tuned on) when
// `adapter_dir` holds a dsopen run's dsopen.yaml, else the model's (data::ChatFormat::for_model over `model_dir`
// and `tokenizer_path`). An SFT template starts with BOS when `bos` and the tokenizer has one.
data::ChatFormat chat_format_for(const std::string& model_dir, const std::string& adapter_dir,
                                 const std::string& tokenizer_path, const data::Tokenizer& tok, bool bos);

// Values the user gave explicitly (unset: the model directory's default, else dsopen's).
struct SamplingRequest {
  std::optional<double> temperature, top_p, repetition_penalty;
  std::optional<int64_t> top_k, max_new_tokens;
  uint64_t seed = 0;
};
// dsopen's defaults where a model directory has no generation_config.json: sampling at temperature 0.8, top-k 50,
// top-p 0.95, repetition penalty 1.1, 128 new tokens.
SamplingOptions resolve_sampling(const std::optional<model::GenerationConfig>& gen, const SamplingRequest& request);
int64_t resolve_max_new_tokens(const std::optional<model::GenerationConfig>& gen, const SamplingRequest& request);
// generation_config.json's max_length (prompt + new tokens) when neither the request nor the file gives
// max_new_tokens; 0: none.
int64_t resolve_max_length(const std::optional<model::GenerationConfig>& gen, const SamplingRequest& request);
// generation_config.json's eos_token_id, else config.json's (one id or a list).
std::vector<int32_t> resolve_eos_ids(const std::optional<model::GenerationConfig>& gen, const model::ModelConfig& c);

}  // namespace dsopen::inference
