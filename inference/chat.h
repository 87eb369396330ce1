// Multi-turn chat in the model's chat format (data/chat_format.h: its Jinja chat template, or the SFT template it
// trained with): every turn renders the conversation so far with the assistant's turn opened and generates until
// EOS or the format's stop marker (the SFT template's <|end|>). The reply joins the conversation as an assistant
// message.
#pragma once

#include <iosfwd>
#include <string>
#include <vector>

#include "data/chat_format.h"
#include "data/sft.h"
#include "inference/generator.h"

namespace dsopen::inference {

// The SFT template's prompt of the next reply: `conv` (ending with a user message) followed by the assistant
// prefix, each piece encoded on its own as SFT data is (data::ChatFormat(tmpl).prompt_ids).
std::vector<int32_t> chat_prompt(const data::Conversation& conv, const data::Tokenizer& tok,
                                 const data::ChatTemplate& tmpl);

// Where a reply ends: the assistant suffix without surrounding whitespace ("<|end|>\n" -> "<|end|>").
std::string chat_stop(const data::ChatTemplate& tmpl);

struct ChatOptions {
  data::ChatFormat format{data::ChatTemplate{}};
  std::string system;        // optional system message, kept when old turns are dropped
  GenerateOptions generate;  // max_new_tokens; chat_stop(tmpl) is added to its stop strings
  bool show_prompt = false;  // print "> " before reading each turn (interactive terminals)
};

// Reads user turns from `in`, one line each, until EOF or "/exit"; "/reset" starts a new conversation. Each reply
// is streamed to `out` followed by a newline. When a prompt would leave fewer than max_new_tokens positions of the
// model's context, the oldest user/assistant exchanges are dropped. Returns the conversation at the end.
data::Conversation chat_loop(model::CausalLM& model, const data::Tokenizer& tok, Sampler& sampler,
                             const ChatOptions& options, std::istream& in, std::ostream& out);

}  // namespace dsopen::inference
