// The text a user sees of a generated sequence: decode(prompt + new) minus decode(prompt). Decoding the new tokens
// alone is not that text: SentencePiece drops the leading space of a text's first piece (dummy prefix), and a
// character whose UTF-8 bytes are split between the prompt's last token and the first new one decodes to U+FFFD
// on either side. The stream decodes a short tail of the prompt with the new tokens and drops the tail's own text,
// so each step costs a decode of the tail and the new tokens, not of the whole prompt.
#pragma once

#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace dsopen::inference {

class TextStream {
public:
  TextStream(const data::Tokenizer& tok, const std::vector<int32_t>& prompt);

  // The visible text after the new tokens `generated` (all of them so far): decode(prompt + generated) minus
  // decode(prompt). Where the prompt's own text changes with what follows (its last character still incomplete),
  // the part after the longest common prefix.
  std::string text(const std::vector<int32_t>& generated) const;

private:
  const data::Tokenizer& tok_;
  std::vector<int32_t> tail_;  // the last prompt tokens, enough that decode(prompt) ends with decode(tail)
  std::string tail_text_;
};

// The text a sequence's new `tokens` show, cut before the first stop string; `stopped` says whether one was
// found. Unless `final`, what may still change is held back: a trailing replacement character (a multi-byte
// character still arriving) and an end that could begin a stop string. Streams hand out the growth of this text.
std::string visible_text(const TextStream& stream, const std::vector<int32_t>& tokens,
                         const std::vector<std::string>& stops, bool final, bool& stopped);

}  // namespace dsopen::inference
