// The OpenAI API's request and response shapes (https://platform.openai.com/docs/api-reference: completions and
// chat completions, streamed as server-sent events or not) over the serving engine (serve/engine.h). Parsing
// checks every field's type and range and says which one is wrong in OpenAI's error object; building turns engine
// events into response objects and stream chunks. No HTTP here (serve/http_server.h).
#pragma once

#include <nlohmann/json.hpp>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "data/chat_format.h"
#include "data/tokenizer.h"
#include "model/generation_config.h"
#include "serve/engine.h"

namespace dsopen::serve {

// An error the client receives as {"error": {"message", "type", "param", "code"}} with HTTP `status`.
// The message is kept whole (NUL bytes of a quoted value included) and cut at 1000 bytes: an error never echoes a
// large request back.
struct ApiError : std::runtime_error {
  ApiError(int status, const std::string& message, std::string param = "", std::string code = "");
  int status;
  std::string message, type, param, code;
};
nlohmann::ordered_json error_body(const ApiError& e);

// The model a server answers for, with what requests need of it.
struct ServedModel {
  std::string name;                  // the `model` requests name and /v1/models lists
  const data::Tokenizer* tok = nullptr;
  data::ChatFormat chat_format{data::ChatTemplate{}};  // how chat messages become a prompt (data/chat_format.h)
  std::optional<model::GenerationConfig> generation;  // defaults for unset sampling fields
  std::vector<int32_t> eos_ids;
  int64_t capacity = 0;              // prompt + generated tokens per sequence
  int64_t max_sequences = 256;       // prompts x n of one request at most (the engine's waiting limit)
  int64_t created = 0;               // unix time the server started (the /v1/models `created`)
  // LoRA adapters served over the model (model/lora.h add_served_adapter), selected by `model`: adapter k (from 1)
  // is adapters[k - 1], with the chat format of its run.
  struct Adapter {
    std::string name;
    data::ChatFormat chat_format;
  };
  std::vector<Adapter> adapters;
};

enum class Endpoint { Completions, ChatCompletions };

struct ApiRequest {
  Endpoint endpoint = Endpoint::Completions;
  std::string model;
  bool stream = false;
  bool include_usage = false;        // stream_options.include_usage: a last chunk with the usage
  bool echo = false;                 // completions: the prompt's text precedes each choice's text
  int64_t n = 1;                     // choices per prompt
  int logprobs = -1;                 // -1: none; else how many alternatives per token (0..20 chat, 0..5 completions)
  std::vector<std::vector<int32_t>> prompts;  // completions may send several; chat has one
  std::vector<std::string> prompt_texts;      // for echo
  GenerationParams params;           // sampling and stop conditions shared by every choice (prompt unset)
  std::optional<uint64_t> seed;
};

// Parses and checks a request body; throws ApiError (400: malformed JSON, wrong type or range, a prompt longer than
// the model's context, max_tokens past it; 404: a model that is neither the served one nor one of its adapters).
ApiRequest parse_request(Endpoint endpoint, const std::string& body, const ServedModel& m);

// The engine's sequences of a request: each prompt × n choices, choice i = prompt * n + j, each with its own seed
// (seed + i when the request gave one).
std::vector<GenerationParams> sequences_of(const ApiRequest& r, std::vector<size_t>& indices);

// Turns the events of one request into its response: the whole object at the end, or stream chunks as they come.
class ResponseWriter {
public:
  ResponseWriter(const ApiRequest& r, const ServedModel& m);

  // Streaming: "data: {json}\n\n" lines. The chat stream opens each choice with its role.
  std::string stream_start() const;
  std::string stream_event(const Event& e);
  std::string stream_end() const;  // the usage chunk (stream_options.include_usage) and "data: [DONE]"
  static std::string stream_error(const ApiError& e);

  // Not streaming: events are collected and the response object built at the end.
  void collect(const Event& e);
  nlohmann::ordered_json body() const;

  // Every choice has finished.
  bool done() const { return finished_ == choices_.size(); }

private:
  struct Choice {
    std::string text;
    std::vector<TokenLogprob> logprobs;
    FinishReason finish = FinishReason::None;
    int64_t completion_tokens = 0;
    size_t streamed_offset = 0;  // streaming: text_offset of the next token's logprob
  };
  nlohmann::ordered_json head(const char* object) const;
  // `text_offset` (completions): where the first token's text starts in the choice's text; advanced past them.
  nlohmann::ordered_json logprobs_json(const std::vector<TokenLogprob>& lps, size_t& text_offset) const;
  nlohmann::ordered_json usage() const;
  void note(const Event& e);

  const ApiRequest& r_;
  const ServedModel& m_;
  std::string id_;
  int64_t created_;
  std::vector<Choice> choices_;
  size_t finished_ = 0;
  int64_t prompt_tokens_ = 0;
};

// GET /v1/models.
nlohmann::ordered_json models_body(const ServedModel& m);

}  // namespace dsopen::serve
