// How a model's conversations become a prompt, the one place dsopen-generate --chat and dsopen-serve ask:
// - the model's own Jinja `chat_template` (chat_template.jinja, or tokenizer_config.json's chat_template, in the
//   model or tokenizer directory: HuggingFace models), rendered by data/jinja.h as transformers'
//   apply_chat_template renders it, with the tokenizer_config.json's bos_token / eos_token strings;
// - else the SFT template (data/sft.h) a dsopen run trained with (data.chat_template of its dsopen.yaml), or
//   dsopen's default, tokenized piece by piece as SFT tokenizes.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "data/jinja.h"
#include "data/sft.h"
#include "data/tokenizer.h"

namespace dsopen::data {

// A conversation from OpenAI-style messages (dsopen-serve's chat requests, dsopen-tokenizer chat): an array of
// {"role", "content"}, role system, developer (OpenAI's newer name for system), user or assistant; content a
// string, a list of {"type": "text", "text": ...} parts (joined), or null for an assistant's. Anything else throws
// MessageError naming the field ("messages[2].content").
struct MessageError : std::runtime_error {
  MessageError(std::string f, const std::string& what) : std::runtime_error(what), field(std::move(f)) {}
  std::string field;
};
Conversation conversation_from_messages(const nlohmann::json& messages);

class ChatFormat {
public:
  // The SFT template `tmpl`.
  explicit ChatFormat(ChatTemplate tmpl);
  // A Jinja template with the special-token strings it is rendered with (an unset one: undefined in the template).
  ChatFormat(const std::string& jinja_source, std::string bos_token, std::string eos_token, std::string where);

  // The format of the model in `model_dir` (a checkpoint or HF directory); `tokenizer_dir` is also searched for
  // the Jinja template (a --tokenizer given apart from the model). Runtime errors name a file that cannot be read
  // or a template that does not parse.
  static ChatFormat for_model(const std::string& model_dir, const std::string& tokenizer_dir = "");
  // The format a run's data.chat_template describes: its `jinja` template when set, else the SFT template itself.
  static ChatFormat for_template(const ChatTemplate& tmpl);
  // The Jinja source of `path` (a .jinja file, a tokenizer_config.json, or a directory holding either), with the
  // bos/eos strings of the tokenizer_config.json there; a runtime error naming the path when there is none.
  static ChatFormat from_jinja_path(const std::string& path);
  // The template's source (Jinja formats only): what an export writes as its chat_template.
  const std::string& jinja_source() const { return source_; }

  bool is_jinja() const { return jinja_ != nullptr; }
  const ChatTemplate& sft_template() const { return tmpl_; }
  // "the model's chat template (tokenizer_config.json)" / "dsopen's chat template": for logs.
  const std::string& description() const { return description_; }

  // The conversation as text: Jinja: the template's output (add_generation_prompt: the assistant's turn opened);
  // SFT: the prompt's ids decoded. Runtime errors carry the template's raise_exception message (a role it does
  // not take, say).
  // `extra`: more template variables (a chat request's chat_template_kwargs, e.g. enable_thinking); Jinja only.
  std::string render(const Conversation& conv, bool add_generation_prompt, const Tokenizer& tok,
                     const nlohmann::json& extra = nlohmann::json::object()) const;

  // The token ids of the next reply's prompt: `conv` rendered with the assistant's turn opened. Jinja: the text
  // encoded with the special tokens (BOS, EOS and the tokenizer's other specials) kept as their ids.
  std::vector<int32_t> prompt_ids(const Conversation& conv, const Tokenizer& tok,
                                  const nlohmann::json& extra = nlohmann::json::object()) const;
  // The same with the assistant's turn opened or not (render's ids).
  std::vector<int32_t> ids(const Conversation& conv, bool add_generation_prompt, const Tokenizer& tok,
                           const nlohmann::json& extra = nlohmann::json::object()) const;

  // Strings that end a reply besides EOS: the SFT template's assistant suffix marker (<|end|>); none for Jinja
  // (the model's EOS ids end it).
  std::vector<std::string> stop_strings() const;

  // A whole conversation for SFT: ids and labels (the assistant's tokens are targets). SFT templates: as
  // data::tokenize_conversation. Jinja: the conversation rendered and encoded at once (special tokens kept as their
  // ids); each reply's targets are the tokens after the prompt that asks for it (the messages before it rendered
  // with the generation prompt) up to where the conversation ending with it parts from the whole — whatever the
  // template writes to close a reply is trained, EOS included when it ends the conversation. A template whose
  // earlier renders are not prefixes of the whole (one that rewrites history) is a runtime error.
  TokenizedConversation tokenize(const Conversation& conv, const Tokenizer& tok) const;

private:
  // `text` encoded with the bos/eos strings in it kept as their ids.
  std::vector<int32_t> encode(const std::string& text, const Tokenizer& tok) const;

  ChatTemplate tmpl_;
  std::shared_ptr<const jinja::Template> jinja_;
  std::string bos_, eos_, description_, source_;
};

}  // namespace dsopen::data
