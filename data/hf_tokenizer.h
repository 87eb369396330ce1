// data::HfTokenizer: the HuggingFace `tokenizer.json` backend for byte-level BPE tokenizers (DeepSeek-LLM,
// DeepSeek-V2/V3, Qwen2-style files), and load_tokenizer(), which picks the backend from a path.
//
// Supported: model BPE (vocab, merges as "a b" strings or [a, b] pairs, ignore_merges, unk_token/fuse_unk);
// normalizer null, absent or an empty Sequence; pre_tokenizer Split (Regex or String pattern, behavior Isolated),
// Digits, ByteLevel (add_prefix_space false, use_regex true or false; last), or a Sequence of those; decoder
// ByteLevel (or null); added tokens (special and not, lstrip/rstrip) matched literally before pre-tokenization.
// Anything else is an error naming the file. Regexes run on PCRE2 (JIT) with the Oniguruma (Ruby syntax)
// semantics `tokenizers` gives them: `^`/`$` match at "\n", \s is Unicode White_Space, \uHHHH escapes. Verified
// id-for-id against `tokenizers` (tests/test_hf_tokenizer.cpp). Not handled: Ruby's \h (hex digit) and small
// differences in \w between the two engines; normalizers (Qwen2's NFC among them) are rejected at load.
// encode() never adds BOS/EOS (the post_processor is ignored), as the SentencePiece backend; callers add them.
// Vocabulary pieces (token_id) are in byte-level form, as in the file: " hello" is "Ġhello".
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "data/tokenizer.h"

namespace dsopen::data {

class HfTokenizer : public Tokenizer {
public:
  // `path_or_dir`: a tokenizer.json file, or a directory holding one. tokenizer_config.json next to it (optional)
  // gives bos/eos/pad tokens and the chat template. Runtime errors name the file and the field.
  static std::unique_ptr<HfTokenizer> load(const std::string& path_or_dir);

  ~HfTokenizer() override;
  // Throws a runtime error for text that is not valid UTF-8.
  std::vector<int32_t> encode(const std::string& text) const override;
  // Special tokens decode to their content; bytes that do not form UTF-8 become U+FFFD, as in HF.
  std::string decode(const std::vector<int32_t>& ids) const override;
  int64_t vocab_size() const override;  // largest id + 1 over vocab and added tokens
  int32_t bos_id() const override;
  int32_t eos_id() const override;
  int32_t pad_id() const override;
  int32_t token_id(const std::string& piece) const override;
  std::string hash() const override { return hash_; }
  std::string source() const override { return path_; }
  // tokenizer_config.json "chat_template" (a Jinja string), or "" when absent.
  std::string chat_template() const { return chat_template_; }

  // The pre-tokenizer's pieces of `text` (no added-token handling, bytes not mapped): for tests and debugging.
  std::vector<std::string> pre_tokenize(const std::string& text) const;

private:
  HfTokenizer();
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string path_, hash_, chat_template_;
};

// Opens a tokenizer by path: a directory holding tokenizer.model (with or without a tokenizer.json converted from
// it), or any file but *.json -> SentencePieceTokenizer; a directory holding only tokenizer.json, or a *.json file
// -> HfTokenizer. A runtime error when nothing is there.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path);

}  // namespace dsopen::data
