// The tokenizer files of an exported HuggingFace model directory: what `AutoTokenizer.from_pretrained(DIR)` needs to
// give the ids dsopen gives (BOS included) and what `apply_chat_template` needs to render the conversations dsopen's
// SFT trained on.
#pragma once

#include <map>
#include <string>

#include "data/sft.h"

namespace dsopen::data {

// The chat template a model was fine-tuned with: data.chat_template of the dsopen.yaml that dsopen-train keeps in
// each checkpoint, or dsopen's default template (data/sft.h) when the directory has none (pretrained models,
// HF directories). A dsopen.yaml that cannot be read is a runtime error naming it.
ChatTemplate chat_template_of(const std::string& model_dir);

// `tmpl` as a Jinja template in transformers' chat_template convention (messages, add_generation_prompt,
// bos_token, eos_token): BOS when add_bos, then prefix + content + suffix per message, EOS after a final assistant
// message when add_eos, the assistant prefix when add_generation_prompt.
std::string chat_template_jinja(const ChatTemplate& tmpl);

// File name -> contents for the directory of the tokenizer found at `tokenizer_dir` (tokenizer.model or
// tokenizer.json):
// - SentencePiece: tokenizer.model, tokenizer.json (SentencePieceTokenizer::hf_tokenizer_json), and
//   tokenizer_config.json / special_tokens_map.json naming its special tokens (bos <s>, eos </s>, pad, unk) with
//   `chat_template` and `model_max_length`.
// - tokenizer.json (an HF directory, or an earlier export): the files found there (tokenizer.json, tokenizer.model,
//   tokenizer_config.json, special_tokens_map.json) as they are; a tokenizer_config.json without a chat_template
//   gets `chat_template`.
// Empty when `tokenizer_dir` is empty. Runtime errors name an unreadable file.
std::map<std::string, std::string> hf_tokenizer_files(const std::string& tokenizer_dir, const ChatTemplate& tmpl,
                                                      int64_t model_max_length);

}  // namespace dsopen::data
