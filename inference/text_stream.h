// The text a user sees of a generated sequence: decode(prompt + new) minus decode(prompt). Decoding the new tokens
// alone is not that text: SentencePiece drops the leading space of a text's first piece (dummy prefix), and a
// character whose UTF-8 bytes are split between the prompt's last token and the first new one decodes to U+FFFD
// on either side.
//
// The stream is incremental, as vLLM's and HF's TextStreamer's detokenizers are: it keeps the text of the tokens
// already settled and decodes only a short window, the tokens since the last settled ones plus one step of
// context before them, taking the window's text minus its context's text. Each token then costs a decode of a
// few tokens, not of everything generated so far (which made streaming quadratic in the length of the answer).
// A token's text is settled once it does not end in U+FFFD (a multi-byte character still arriving).
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
  // the part after the longest common prefix. Each call's `generated` extends the previous call's (a shorter one
  // starts the stream over).
  const std::string& text(const std::vector<int32_t>& generated);

  // How much of text(tokens) a user may see now: the text cut before the first stop string (`stopped` says whether
  // one was found) and, unless `final`, without what may still change: a trailing replacement character (a
  // multi-byte character still arriving) and an end that could begin a stop string. It only grows from call to
  // call; streams hand out text().substr(shown before, visible - shown before). Stop strings are searched only
  // where a new one could be (from the settled text's end at the previous call, less a stop string's length).
  size_t visible(const std::vector<int32_t>& tokens, const std::vector<std::string>& stops, bool final, bool& stopped);

  // The text of the last call (text() or visible()).
  const std::string& current() const { return text_; }

private:
  void restart();

  const data::Tokenizer& tok_;
  std::vector<int32_t> tail_;  // the last prompt tokens, enough that decode(prompt) ends with decode(tail)
  std::string tail_text_;
  std::vector<int32_t> ids_;   // tail_ + the generated tokens seen so far
  size_t context_ = 0;         // window start: ids_[context_, settled_) is the context, its text context_text_
  size_t settled_ = 0;         // tokens whose text is settled (text_[0, settled_size_))
  std::string context_text_;
  size_t settled_size_ = 0;    // text_[0, settled_size_): the text of generated tokens before ids_[settled_]
  std::string text_;           // the settled text, then the window's new text: what text() returns
  size_t stop_search_from_ = 0;  // no stop string starts before here (visible())
};


}  // namespace dsopen::inference
