// generation_config.json (transformers GenerationConfig): the generation defaults a model directory ships — which
// tokens end a text and how to sample. dsopen-generate starts from it; flags given on the command line win.
//
// Read as transformers reads it: keys absent from the file take transformers' defaults (do_sample false = greedy,
// temperature 1, top_k 50, top_p 1, repetition_penalty 1); eos_token_id may be one id or a list. A directory
// without the file falls back, as transformers does, to the generation keys an older config.json carries.
// Controls dsopen does not implement (beam search, n-gram blocking, suppressed or forced tokens, min_p, typical_p,
// ...) are refused by name when set to anything but their no-op value, rather than generate something else.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "model/config.h"

namespace dsopen::model {

struct GenerationConfig {
  std::optional<std::vector<int64_t>> eos_token_id;  // any of them ends a sequence; unset: the model config's
  std::optional<int64_t> bos_token_id, pad_token_id;
  bool do_sample = false;  // false: greedy, whatever the sampling values say
  double temperature = 1.0;
  int64_t top_k = 50;  // 0: off
  double top_p = 1.0;
  double repetition_penalty = 1.0;
  std::optional<int64_t> max_new_tokens;
  std::optional<int64_t> max_length;  // prompt + new tokens (used when max_new_tokens is not given)
  std::vector<std::string> stop_strings;  // a generated text ends before the first of them
  std::string source;  // the file it came from (for messages)
  nlohmann::json json;  // the object as read; written back unchanged on export
};

// DIR/generation_config.json, else the generation keys of DIR/config.json, else nothing. Errors name the file and
// the key (a wrong type, a negative id: usage errors, as for config.json; a repeated key, invalid JSON).
std::optional<GenerationConfig> read_generation_config(const std::string& dir);


// The file dsopen writes next to exported weights when the source had none: the model's token ids and the
// sampling defaults of dsopen-generate, so transformers' generate() samples the same way.
nlohmann::json default_generation_json(const ModelConfig& c);

}  // namespace dsopen::model
