#include "inference/text_stream.h"

#include <algorithm>

namespace dsopen::inference {

namespace {
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
const std::string kReplacement = "\xEF\xBF\xBD";  // U+FFFD: what a decode shows for a character still incomplete
bool starts_with_replacement(const std::string& s) { return s.rfind(kReplacement, 0) == 0; }
}  // namespace

TextStream::TextStream(const data::Tokenizer& tok, const std::vector<int32_t>& prompt) : tok_(tok) {
  const std::string whole = tok.decode(prompt);
  // Grow the tail until its text is the end of the prompt's text and starts on a character boundary (a tail that
  // begins inside a multi-byte character decodes to U+FFFD there). Eight tokens cover any UTF-8 character.
  size_t n = std::min<size_t>(prompt.size(), 8);
  while (true) {
    tail_.assign(prompt.end() - static_cast<std::ptrdiff_t>(n), prompt.end());
    tail_text_ = tok.decode(tail_);
    // A tail showing no text would make the first new piece the first of its decode (SentencePiece drops its
    // leading space there): it takes at least a character of the prompt's text.
    if (n == prompt.size() ||
        (ends_with(whole, tail_text_) && !starts_with_replacement(tail_text_) && !tail_text_.empty()))
      break;
    n = std::min(prompt.size(), n * 2);
  }
  restart();
}

void TextStream::restart() {
  stop_search_from_ = 0;
  ids_ = tail_;
  context_ = 0;
  settled_ = ids_.size();
  context_text_ = tail_text_;
  settled_size_ = 0;
  text_.clear();
}

const std::string& TextStream::text(const std::vector<int32_t>& generated) {
  if (generated.size() < ids_.size() - tail_.size()) restart();
  ids_.insert(ids_.end(), generated.begin() + static_cast<std::ptrdiff_t>(ids_.size() - tail_.size()),
              generated.end());
  if (ids_.size() == settled_) return text_;
  const std::string window =
      tok_.decode(std::vector<int32_t>(ids_.begin() + static_cast<std::ptrdiff_t>(context_), ids_.end()));
  std::string fresh;
  if (window.compare(0, context_text_.size(), context_text_) == 0) {
    fresh = window.substr(context_text_.size());
  } else {
    // The context's last character was incomplete (only the prompt's can be: generated text settles on whole
    // characters) and the new bytes completed it: keep what follows the common prefix, from a character boundary.
    size_t common = 0;
    while (common < window.size() && common < context_text_.size() && window[common] == context_text_[common])
      ++common;
    while (common > 0 && (static_cast<unsigned char>(window[common]) & 0xC0) == 0x80) --common;
    fresh = window.substr(common);
  }
  text_.resize(settled_size_);  // the settled text, then the window's: one string, appended to in place
  text_ += fresh;
  if (!ends_with(fresh, kReplacement)) {
    // Settle the window. The next context is the tokens just settled, unless they show no text (special tokens):
    // a context decoding to nothing would make the next piece the first of its decode, where SentencePiece drops
    // a leading space the whole text keeps; the window then keeps its older context.
    std::string next =
        tok_.decode(std::vector<int32_t>(ids_.begin() + static_cast<std::ptrdiff_t>(settled_), ids_.end()));
    if (next.empty()) {
      context_text_ = window;
    } else {
      context_ = settled_;
      context_text_ = std::move(next);
    }
    settled_ = ids_.size();
    settled_size_ = text_.size();
  }
  return text_;
}

size_t TextStream::visible(const std::vector<int32_t>& tokens, const std::vector<std::string>& stops, bool final,
                           bool& stopped) {
  const std::string& all = text(tokens);
  stopped = false;
  size_t cut = all.size(), longest = 0;
  for (const auto& s : stops) {
    longest = std::max(longest, s.size());
    const auto at = s.empty() ? std::string::npos : all.find(s, stop_search_from_);
    if (at != std::string::npos && at < cut) cut = at, stopped = true;
  }
  // Settled text never changes: a stop string found later ends past it, so starts at most `longest - 1` before
  // (and one found now is found again by the final call).
  stop_search_from_ = std::min(cut, settled_size_ > longest ? settled_size_ - longest + 1 : 0);
  if (final || stopped) return cut;
  size_t n = all.size();
  while (n >= kReplacement.size() && all.compare(n - kReplacement.size(), kReplacement.size(), kReplacement) == 0)
    n -= kReplacement.size();
  // Hold back an end of the text that may be the start of a stop string: once shown it could not be taken back.
  size_t hold = 0;
  for (const auto& s : stops)
    for (size_t k = std::min(s.size() - (s.empty() ? 0 : 1), n); k > hold; --k)
      if (all.compare(n - k, k, s, 0, k) == 0) {
        hold = k;
        break;
      }
  return n - hold;
}

}  // namespace dsopen::inference
